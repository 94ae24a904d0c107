"""Interventions side by side on one preference–utility frontier, compared at matched utility with intervals.

The paper's central comparison (arXiv 2602.02343, §5, Table 3): local weight, LoRA and vector steering, or SPLIT
against SFT and RePS, are compared by the preference they gain *at the same utility cost*. From the folders that
``fastsplit sweep`` writes (``sweep.csv`` and ``fit.json``, swept on the same pairs with the same model):

* **Frontier**, per side of m (m ≥ 0 and m ≤ 0, each walked away from 0): the measured mean utility drop
  ``D(m) = U(0) − U(m)`` against the mean preference gain ``G(m) = P(m) − P(0)``.
* **Gain at a matched drop d**: G where the frontier first reaches D = d, linearly interpolated between the two
  swept m around it; a drop the side never reaches is reported as not reached (None), never extrapolated.
* **Accuracy** (the paper's): the share of pairs with L_neg > L_pos, at m = 0 and at the operating point.
* **Intervals**: pairs are resampled with replacement (the same resample for every intervention, so differences
  are paired) for 95% percentile intervals of each figure and of each difference between two interventions at
  each matched drop, with the share of resamples in which both reach it.

Example::

    >>> result = compare(["sweeps/vector", "sweeps/lora"], out="cmp")
    >>> result["pairwise"]["vector L15 split − lora L15 split"]["positive"]["1"]
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
from typing import Sequence

import numpy as np

from .logodds import Sweep
from .plot import save_figure

__all__ = ["compare", "read_sweep_dir", "gain_at_drop", "frontier", "DROPS"]

DROPS = (0.5, 1.0, 2.0)
SIDES = ("positive", "negative")


def read_sweep_dir(path: str) -> dict:
    """A folder ``fastsplit sweep`` wrote: {"path", "sweep": Sweep, "fit": fit.json, "label", "provenance"}."""
    fit_path, csv_path = os.path.join(path, "fit.json"), os.path.join(path, "sweep.csv")
    for p in (csv_path, fit_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} is not a sweep folder: {os.path.basename(p)} is missing")
    try:
        with open(fit_path) as f:
            fit = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{fit_path} is not readable JSON: {exc}") from None
    prov = fit.get("provenance")
    if not isinstance(prov, dict) or "pairs_sha256" not in prov:
        raise ValueError(f"{fit_path} records no provenance (written before fastsplit recorded the pairs and model of "
                         "a sweep): sweep it again")
    sweep = Sweep.from_csv(csv_path)
    return {"path": path, "sweep": sweep, "fit": fit, "provenance": prov, "label": _label(prov)}


def _label(prov: dict) -> str:
    st = prov.get("steering", {})
    return f"{st.get('form', '?')} L{st.get('layer', '?')} {st.get('objective', '?')}"


def _at(ms: np.ndarray, values: np.ndarray, m: float) -> np.ndarray:
    """Values [..., M] at strength ``m``, linearly interpolated along the (sorted) multipliers."""
    order = np.argsort(ms)
    flat = values.reshape(-1, ms.size)
    return np.array([np.interp(m, ms[order], row[order]) for row in flat]).reshape(values.shape[:-1])


def frontier(ms: np.ndarray, pref_mean: np.ndarray, util_mean: np.ndarray, side: str) -> tuple[np.ndarray, ...]:
    """(m, utility drop D, preference gain G) along one side of m, from m = 0 outward (m = 0 interpolated in when
    the grid lacks it)."""
    ms = np.asarray(ms, np.float64)
    p0, u0 = float(_at(ms, pref_mean[None], 0.0)[0]), float(_at(ms, util_mean[None], 0.0)[0])
    keep = ms > 0 if side == "positive" else ms < 0
    order = np.argsort(np.abs(ms[keep]))
    m_side = np.concatenate([[0.0], ms[keep][order]])
    drop = np.concatenate([[0.0], u0 - util_mean[keep][order]])
    gain = np.concatenate([[0.0], pref_mean[keep][order] - p0])
    return m_side, drop, gain


def gain_at_drop(ms, pref_mean, util_mean, drop: float, side: str) -> float | None:
    """Preference gain where the measured utility drop first reaches ``drop`` on ``side``, interpolated between the
    swept m around it; None when the side never drops that far (no extrapolation)."""
    _, d, g = frontier(ms, pref_mean, util_mean, side)
    hit = np.nonzero(d >= drop)[0]
    if hit.size == 0:
        return None
    j = int(hit[0])
    if j == 0:
        return 0.0
    t = (drop - d[j - 1]) / (d[j] - d[j - 1])
    return float(g[j - 1] + t * (g[j] - g[j - 1]))


def _figures(sweep: Sweep, m_op: float, drops: Sequence[float], idx: np.ndarray | None = None) -> dict:
    """Every compared figure of one intervention, on all pairs or on the resample ``idx``."""
    pref = sweep.pref_odds if idx is None else sweep.pref_odds[idx]
    util = sweep.util_odds if idx is None else sweep.util_odds[idx]
    ms = sweep.multipliers
    P, U = pref.mean(0), util.mean(0)
    p0, u0 = float(_at(ms, P[None], 0.0)[0]), float(_at(ms, U[None], 0.0)[0])
    out = {"gain_at_op": float(_at(ms, P[None], m_op)[0]) - p0, "drop_at_op": u0 - float(_at(ms, U[None], m_op)[0]),
           "accuracy_m0": float((_at(ms, pref, 0.0) > 0).mean()), "accuracy_op": float((_at(ms, pref, m_op) > 0).mean())}
    for side in SIDES:
        for d in drops:
            out[f"gain@{d:g}:{side}"] = gain_at_drop(ms, P, U, d, side)
        out[f"largest_drop:{side}"] = float(frontier(ms, P, U, side)[1].max())  # <= 0: utility never falls there
    return out


def _interval(values) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = len(values)
    if not v.size:
        return {"lo": None, "hi": None, "reached": 0.0}
    return {"lo": float(np.percentile(v, 2.5)), "hi": float(np.percentile(v, 97.5)), "reached": v.size / n}


def _check_same(runs: list[dict]) -> None:
    first = runs[0]
    for r in runs[1:]:
        for key, what in (("pairs_sha256", "pairs"), ("model", "model")):
            if r["provenance"].get(key) != first["provenance"].get(key):
                raise ValueError(f"{r['path']} was swept on other {what} than {first['path']} "
                                 f"({r['provenance'].get(key)!r} vs {first['provenance'].get(key)!r}): compare needs "
                                 "sweeps of the same pairs with the same model")


def compare(sweep_dirs: Sequence[str], out: str | None = None, *, drops: Sequence[float] = DROPS,
            bootstrap: int = 1000, seed: int = 0, labels: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Compare interventions swept on the same pairs: returns (and with ``out`` writes compare.json, compare.csv and
    compare.png/.svg) {"interventions": [{label, figures with intervals, ...}], "pairwise": {"A − B": {side: {drop:
    {diff, lo, hi, reached}}}}, "drops", "bootstrap", "pairs"}. Folders swept on other pairs or another model are
    refused in one line before any work."""
    from tqdm.auto import tqdm

    if len(sweep_dirs) < 2:
        raise ValueError(f"compare needs at least two sweep folders, got {len(sweep_dirs)}")
    if any(not (isinstance(d, (int, float)) and d > 0) for d in drops):
        raise ValueError(f"drops must be positive numbers of nats, got {list(drops)}")
    runs = [read_sweep_dir(p) for p in sweep_dirs]
    _check_same(runs)
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"labels has {len(labels)} names for {len(runs)} sweep folders")
        for r, name in zip(runs, labels):
            r["label"] = name
    seen = {}
    for r in runs:  # two runs with one label (same form, layer and objective) get their folder's name too
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in runs:
        if seen[r["label"]] > 1:
            r["label"] += f" ({os.path.basename(os.path.normpath(r['path']))})"
    N = runs[0]["sweep"].pref_odds.shape[0]
    rng = np.random.default_rng(seed)
    m_ops = [float(r["fit"]["operating_point"]["multiplier"]) for r in runs]
    point = [_figures(r["sweep"], m_op, drops) for r, m_op in zip(runs, m_ops)]
    samples = [[] for _ in runs]
    for _ in tqdm(range(bootstrap), desc="pair bootstrap", disable=not progress, leave=False):
        idx = rng.integers(0, N, N)
        for k, (r, m_op) in enumerate(zip(runs, m_ops)):
            samples[k].append(_figures(r["sweep"], m_op, drops, idx))
    table = []
    for r, m_op, pt, smp in zip(runs, m_ops, point, samples):
        fit = r["fit"]
        row = {"label": r["label"], "path": r["path"], "form": r["provenance"]["steering"].get("form"),
               "layer": r["provenance"]["steering"].get("layer"),
               "objective": r["provenance"]["steering"].get("objective"),
               "preference_r2_heldout_m": fit["scores"].get("preference_r2_heldout_m"),
               "utility_r2_heldout_m": fit["scores"].get("utility_r2_heldout_m"), "m_op": m_op,
               "m_op_interval": (fit.get("bootstrap") or {}).get("m_op"), "figures": {}}
        for name, value in pt.items():
            row["figures"][name] = {"value": value, **_interval([s[name] for s in smp])}
        table.append(row)
    pairwise = {}
    for (a, ra), (b, rb) in itertools.combinations(enumerate(runs), 2):
        block = {}
        for side in SIDES:
            block[side] = {}
            for d in drops:
                name = f"gain@{d:g}:{side}"
                va, vb = point[a][name], point[b][name]
                diffs = [None if sa[name] is None or sb[name] is None else sa[name] - sb[name]
                         for sa, sb in zip(samples[a], samples[b])]
                block[side][f"{d:g}"] = {"diff": None if va is None or vb is None else va - vb, **_interval(diffs)}
        pairwise[f"{ra['label']} − {rb['label']}"] = block
    result = {"interventions": table, "pairwise": pairwise, "drops": list(drops), "bootstrap": bootstrap,
              "pairs": N, "model": runs[0]["provenance"].get("model"),
              "pairs_source": runs[0]["provenance"].get("pairs_source")}
    if out is not None:
        write(result, runs, out)
    return result


def not_reached(largest_drop: float, side: str) -> str:
    """Why a matched drop has no gain on ``side``, in words: utility never falls there, or not that far."""
    where = "m > 0" if side == "positive" else "m < 0"
    if largest_drop <= 0:
        return f"utility rises for {where}: no drop to match"
    return f"not reached (largest drop {largest_drop:.2f})"


def _fmt(cell: dict | None, share: bool = False, why: str = "not reached") -> str:
    if cell is None or cell.get("value") is None:
        return why
    lo, hi = cell.get("lo"), cell.get("hi")
    if share:
        return f"{cell['value']:.0%}" + (f" [{lo:.0%}, {hi:.0%}]" if lo is not None else "")
    band = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
    return f"{cell['value']:+.3f}{band}"


def format_table(result: dict) -> str:
    """The printed table: per intervention the fits, the operating point and the gains at matched drops (positive
    side), then every pairwise difference whose interval excludes 0, and those that do not."""
    drops = result["drops"]
    head = ["intervention", "R2 pref/util (held-out m)", "m_op", "gain at m_op", "drop at m_op", "acc m=0", "acc m_op"]
    head += [f"gain @ drop {d:g}" for d in drops]
    lines = [" | ".join(head)]
    for r in result["interventions"]:
        f = r["figures"]
        r2 = "/".join("n/a (swept at under 10 m)" if v is None else f"{v:.3f}" for v in (r["preference_r2_heldout_m"],
                                                                   r["utility_r2_heldout_m"]))
        cells = [r["label"], r2, f"{r['m_op']:.2f}", _fmt(f["gain_at_op"]), _fmt(f["drop_at_op"]),
                 _fmt(f["accuracy_m0"], share=True), _fmt(f["accuracy_op"], share=True)]
        why = not_reached(f["largest_drop:positive"]["value"], "positive")
        cells += [_fmt(f[f"gain@{d:g}:positive"], why=why) for d in drops]
        lines.append(" | ".join(cells))
    lines.append(f"differences at matched utility drop (m >= 0; pair bootstrap, {result['bootstrap']} resamples, 95%):")
    by_label = {r["label"]: r["figures"] for r in result["interventions"]}
    for name, block in result["pairwise"].items():
        a, b = name.split(" − ")
        parts = []
        for d in drops:
            c = block["positive"][f"{d:g}"]
            if c["diff"] is None or c["lo"] is None:
                rises = [n for n in (a, b) if by_label[n]["largest_drop:positive"]["value"] <= 0]
                parts.append(f"drop {d:g}: " + (f"utility rises for m > 0 in {', '.join(rises)}: no drop to match"
                                                if rises else "not reached by both"))
                continue
            verdict = (f"{a} ahead" if c["lo"] > 0 else f"{b} ahead" if c["hi"] < 0 else "no difference shown")
            parts.append(f"drop {d:g}: {c['diff']:+.3f} [{c['lo']:+.2f}, {c['hi']:+.2f}] {verdict}")
        lines.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(lines)


def write(result: dict, runs: list[dict], out: str) -> list[str]:
    """compare.json, compare.csv and the figure (compare.png, compare.svg) in ``out``, each written whole."""
    from ..dist import atomic_write

    os.makedirs(out, exist_ok=True)

    def dump_json(p):
        with open(p, "w") as f:
            json.dump(result, f, indent=2)

    def dump_csv(p):
        names = list(result["interventions"][0]["figures"])
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "form", "layer", "objective", "preference_r2_heldout_m", "utility_r2_heldout_m", "m_op"]
                       + [f"{n}{s}" for n in names for s in ("", "_lo", "_hi", "_reached")])
            for r in result["interventions"]:
                w.writerow([r["label"], r["form"], r["layer"], r["objective"], r["preference_r2_heldout_m"],
                            r["utility_r2_heldout_m"], r["m_op"]]
                           + [r["figures"][n].get(k) for n in names for k in ("value", "lo", "hi", "reached")])
    paths = [os.path.join(out, "compare.json"), os.path.join(out, "compare.csv")]
    atomic_write(paths[0], dump_json)
    atomic_write(paths[1], dump_csv)
    return paths + plot_compare(runs, result, os.path.join(out, "compare"))


def plot_compare(runs: list[dict], result: dict, path_prefix: str) -> list[str]:
    """Three panels: preference and utility against m for every intervention, and the preference–utility frontier
    (utility drop from m = 0 against preference gain; solid m ≥ 0, dashed m ≤ 0; stars at the operating points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for k, (r, row) in enumerate(zip(runs, result["interventions"])):
        s, colour = r["sweep"].summary(), f"C{k % 10}"
        ms = s["multiplier"]
        axes[0].errorbar(ms, s["pref_mean"], yerr=s["pref_se"], fmt="o-", ms=3, color=colour, label=row["label"])
        axes[1].errorbar(ms, s["util_mean"], yerr=s["util_se"], fmt="o-", ms=3, color=colour, label=row["label"])
        for side, style in (("positive", "-"), ("negative", "--")):
            _, drop, gain = frontier(ms, s["pref_mean"], s["util_mean"], side)
            axes[2].plot(drop, gain, style, marker="o", ms=3, color=colour,
                         label=f"{row['label']} (m {'≥' if side == 'positive' else '≤'} 0)")
        f = row["figures"]
        axes[2].plot([f["drop_at_op"]["value"]], [f["gain_at_op"]["value"]], marker="*", ms=14, color=colour,
                     markeredgecolor="k", zorder=4)
        for ax in axes[:2]:
            ax.axvline(row["m_op"], color=colour, ls=":", lw=1)
    for d in result["drops"]:
        axes[2].axvline(d, color="0.6", ls=":", lw=1)
    titles = (("Preference", "steering factor $m$", r"preference log-odds $L_n - L_p$ (nats)"),
              ("Utility", "steering factor $m$", "utility log-odds (nats)"),
              ("Preference–utility frontier", "utility drop from m = 0 (nats)", "preference gain from m = 0 (nats)"))
    for ax, (title, xl, yl) in zip(axes, titles):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    axes[2].text(0.02, 0.97, "stars: operating points; dotted: matched drops " +
                 ", ".join(f"{d:g}" for d in result["drops"]), transform=axes[2].transAxes, fontsize=7, va="top",
                 color="0.3")
    fig.suptitle(f"{len(runs)} interventions on the same {result['pairs']} pairs ({result.get('model') or '?'})",
                 fontsize=10)
    return save_figure(fig, path_prefix)

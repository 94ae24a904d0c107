"""``analyze``: both fits, a held-out test of the curve, bootstrap intervals, the operating point, and
shortcut diagnostics, as one report whose every score is named.

* **Held-out m** (``heldout_m``): each swept m is left out in turn, the curve is refitted on the others and
  scored on the one left out: R² over those predictions. This tests the functional form, which a fit's own
  R² cannot (21 points, 9 parameters).
* **Pair bootstrap** (``bootstrap``): pairs are resampled with replacement, both curves refitted and the
  operating point chosen again: 95% percentile intervals of both R² and of m_op.
* **Answer groups** (``groups``): pairs grouped by their positive completion's first token (" Yes", " No",
  " (A)" …). When groups move in opposite directions the mean curve is two shortcuts cancelling, and the
  report warns that the vector follows the answer token, not the concept. ``share_rising`` is the share of
  pairs whose preference is above its m = 0 value, per m.
"""
from __future__ import annotations

import math

import numpy as np

from .. import dist
from .fit import MIN_POINTS, REFIT_TOL, fit_curves, fit_many, operating_point, simpler_member

__all__ = ["analyze", "heldout_m_r2", "bootstrap", "answer_groups"]

_OPPOSITE_MIN = 0.1  # nats: a group's mean preference change that counts as a movement


def heldout_m_r2(multipliers, values, kind: str, fit=None, *, group=None) -> float | None:
    """R² of leave-one-m-out predictions (None with fewer than MIN_POINTS + 1 multipliers). Inside a process
    group the refits are shared out between the ranks (the same value as one process)."""
    m, y = _curve(multipliers, values)
    if m.size < MIN_POINTS + 1:
        return None
    fit = fit or fit_curves(m, y, kind)
    pred = dist.run_tasks(lambda j: _heldout_refit(m, y, kind, fit, j), m.size, dist.active_group(group),
                          what=f"held-out-m refits of the {kind} fit")
    return _heldout_score(y, pred)


def _curve(multipliers, values) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(values, np.float64)
    return np.asarray(multipliers, np.float64), (y.mean(0) if y.ndim == 2 else y)


def _heldout_refit(m, y, kind, fit, j) -> float:
    """The prediction at m[j] of a refit without it (from ``fit``)."""
    keep = np.arange(m.size) != j
    return float(fit_curves(m[keep], y[keep], kind, starts=1, init=fit, tol=REFIT_TOL).predict(m[j:j + 1])[0])


def _heldout_score(y, pred) -> float:
    pred = np.asarray(pred, np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def _interval(values) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None


def bootstrap(sweep, pref_fit, util_fit, *, n: int = 100, max_util_drop: float = 1.0, seed: int = 0,
              progress: bool = False, group=None, before=None) -> dict:
    """Pair-bootstrap 95% intervals of the preference and utility R² and of the operating point's m.

    Inside a process group every rank draws the same resamples and the refits are shared out between the ranks
    (:func:`fastsplit.dist.run_tasks`); the gathered results are those of one process, bit for bit, so the intervals
    are too. ``before``: this rank's own work before its first refit (:func:`fastsplit.dist.run_tasks`)."""
    from tqdm.auto import tqdm

    group = dist.active_group(group)
    rng = np.random.default_rng(seed)
    N = sweep.pref_odds.shape[0]
    draws = [rng.integers(0, N, N) for _ in range(n)]  # every rank: the one-process sequence of resamples

    def refit(k):  # tasks 0..n-1: the preference refits (the slow ones, first), n..2n-1: the utility refits
        kind, values, full = ("preference", sweep.pref_odds, pref_fit) if k < n else ("utility", sweep.util_odds,
                                                                                         util_fit)
        bar.update(1)
        try:
            return fit_curves(sweep.multipliers, values[draws[k % n]].mean(0), kind, starts=0, init=full,
                              tol=REFIT_TOL)
        except (RuntimeError, ValueError):  # a degenerate resample (constant values): no fit to score
            return None
    bar = tqdm(total=2 * n, desc="bootstrap", disable=not progress, leave=False)
    # A task per refit, not per resample: the preference refits vary most (a few run for thousands of evaluations)
    # and the utility refits behind them, each a few milliseconds, fill in while the slowest finish elsewhere.
    fits = dist.run_tasks(refit, 2 * n, group, what="pair bootstrap", before=before)
    bar.close()
    done = [(fp.r2, fu.r2, operating_point(fp, fu, sweep.multipliers, sweep.util_odds[draws[k]].mean(0),
                                           max_util_drop=max_util_drop).multiplier)
            for k, (fp, fu) in enumerate(zip(fits[:n], fits[n:])) if fp is not None and fu is not None]
    r2p, r2u, mop = ([r[i] for r in done] for i in range(3))
    return {"resamples": len(r2p), "preference_r2": _interval(r2p), "utility_r2": _interval(r2u),
            "m_op": _interval(mop)}


def _at(sweep, values_nm, m: float) -> np.ndarray:
    """Per-pair values at strength ``m``, interpolated between swept m: [N]."""
    ms = sweep.multipliers
    order = np.argsort(ms)
    return np.array([np.interp(m, ms[order], row[order]) for row in values_nm])


def answer_groups(sweep, m_probe: float) -> dict:
    """Preference per answer group and the share of pairs whose preference rises, with a shortcut warning.

    Returns {"by_group": {token: {"pairs", "pref_mean" [M], "change_at_probe"}}, "share_rising" [M],
    "m_probe", "opposite": bool}; ``change_at_probe`` is the group's mean preference change from m = 0 to
    ``m_probe`` (the operating point, or the rising edge when that is 0)."""
    base = _at(sweep, sweep.pref_odds, 0.0)
    rising = (sweep.pref_odds > base[:, None] + 1e-9).mean(0)
    change = _at(sweep, sweep.pref_odds, m_probe) - base
    labels = sweep.groups or ["(all)"] * sweep.pref_odds.shape[0]
    by = {}
    for g in sorted(set(labels)):
        rows = np.array([lab == g for lab in labels])
        by[g] = {"pairs": int(rows.sum()), "pref_mean": sweep.pref_odds[rows].mean(0).tolist(),
                 "change_at_probe": float(change[rows].mean())}
    moving = [v["change_at_probe"] for v in by.values() if v["pairs"] >= 2 and abs(v["change_at_probe"]) >= _OPPOSITE_MIN]
    opposite = bool(moving) and min(moving) < 0 < max(moving)
    return {"by_group": by, "share_rising": rising.tolist(), "m_probe": float(m_probe), "opposite": opposite}


def analyze(sweep, *, max_util_drop: float = 1.0, bootstrap_samples: int = 100, seed: int = 0,
            progress: bool = False, group=None, on_fits=None) -> dict:
    """Both fits on the per-m means, held-out-m R², pair-bootstrap intervals, the operating point (judged
    against *measured* utility), answer-group diagnostics, and the warnings a reader must see.

    Returns {"preference": Fit, "utility": Fit, "operating_point": OperatingPoint, "heldout_m": {kind: R²},
    "bootstrap": {...}, "groups": {...}, "identifiability": {kind: {"not_identified", "simpler", "at_zero"}},
    "warnings": [str]}. ``simpler`` is a simpler member of the paper's family that fits as well (or None);
    ``at_zero`` compares each fit's value at m = 0 with the measured mean there.

    ``on_fits(result)``: called on this rank with everything but the bootstrap (``result["bootstrap"]`` None)
    before the bootstrap starts, for work that needs only the fits (a plot); inside a process group the other
    ranks meanwhile take more of the bootstrap's refits, so a rank 0 that draws costs little wall time.

    Example::

        >>> report = analyze(sweep)
        >>> report["heldout_m"]["preference"], report["operating_point"].multiplier, report["warnings"]
    """
    m = sweep.multipliers
    group = dist.active_group(group)
    # Inside a process group the fits are shared out (the two curves' starts in one pool, their refits, the
    # simpler members, the bootstrap), each rank doing its part; the results are one process's. One pool, not one
    # curve a rank: the preference fit's starts take about three times the utility fit's.
    pref, util = fit_many([(m, sweep.pref_odds, "preference"), (m, sweep.util_odds, "utility")], group=group)
    y_pref, y_util = sweep.pref_odds.mean(0), sweep.util_odds.mean(0)  # the per-m means the curves were fitted to
    op = operating_point(pref, util, m, y_util, max_util_drop=max_util_drop)
    # The held-out-m refits of both curves and the two simpler members: one pool of tasks, the slowest kind first.
    heldout_js = range(m.size) if m.size >= MIN_POINTS + 1 else range(0)
    tasks = ([lambda j=j: _heldout_refit(m, y_pref, "preference", pref, j) for j in heldout_js] +
             [lambda: simpler_member(pref, m, sweep.pref_odds), lambda: simpler_member(util, m, sweep.util_odds)] +
             [lambda j=j: _heldout_refit(m, y_util, "utility", util, j) for j in heldout_js])
    done = dist.run_tasks(lambda k: tasks[k](), len(tasks), group, what="held-out-m refits and simpler fits")
    n_h = len(heldout_js)
    heldout = {"preference": _heldout_score(y_pref, done[:n_h]) if n_h else None,
               "utility": _heldout_score(y_util, done[n_h + 2:]) if n_h else None}
    simpler = {0: done[n_h], 1: done[n_h + 1]}
    probe = op.multiplier if op.multiplier != 0 else float(m.max() if op.side == "positive" else m.min())
    groups = answer_groups(sweep, probe)
    warnings = list(op.warnings)
    if groups["opposite"]:
        moves = ", ".join(f"{g!r} {v['change_at_probe']:+.2f}" for g, v in groups["by_group"].items())
        warnings.append(f"answer groups move in opposite directions at m = {probe:g} ({moves}): the vector follows "
                        "the answer token, not the concept; balance the answers per group or change the format")
    ident = {}
    for k, (fit, values, means) in enumerate(((pref, sweep.pref_odds, y_pref), (util, sweep.util_odds, y_util))):
        if not fit.converged:
            warnings.append(f"the {fit.kind} fit did not converge from any start: its curve is the best iterate "
                            "found, not an optimum; do not read its parameters")
        simple = simpler[k]
        measured = float(np.interp(0.0, np.sort(m), means[np.argsort(m)]))
        fitted = float(fit.predict(np.array([0.0]))[0])
        ident[fit.kind] = {"not_identified": fit.not_identified, "simpler": simple.to_dict() if simple else None,
                           "at_zero": {"fitted": fitted, "measured": measured, "gap": fitted - measured}}
        if fit.not_identified:
            names = ", ".join(fit.not_identified)
            better = (f"; the simpler member '{simple.member}' fits as well (R² {simple.r2:.3f})" if simple
                      else "")
            warnings.append(f"the {fit.kind} fit's parameters {names} are not identified (on a bound, or not "
                            f"determined by the data): read the curve, not those values{better}")
        gap = fitted - measured
        n = values.shape[0]
        se0 = float(np.interp(0.0, np.sort(m), (values.std(0, ddof=1) / math.sqrt(n))[np.argsort(m)])) if n > 1 else 0.0
        ident[fit.kind]["at_zero"]["measured_se"] = se0
        if abs(gap) > 2 * se0:  # the curve misses the measurement at 0 by more than its uncertainty
            warnings.append(f"the {fit.kind} fit gives {fitted:+.3f} at m = 0 where the measured mean is "
                            f"{measured:+.3f} ± {se0:.3f} (a gap of {gap:+.3f}): the two-sided decay cannot match "
                            "m = 0 and its neighbours at once; judge utility by the measured values")
    result = {"preference": pref, "utility": util, "operating_point": op, "heldout_m": heldout, "bootstrap": None,
              "groups": groups, "identifiability": ident, "warnings": warnings}
    before = (lambda: on_fits(result)) if on_fits is not None else None
    if bootstrap_samples and sweep.pref_odds.shape[0] >= 2:
        result["bootstrap"] = bootstrap(sweep, pref, util, n=bootstrap_samples, max_util_drop=max_util_drop,
                                        seed=seed, progress=progress, group=group, before=before)
    else:  # every rank makes this call (the collective), whether or not it has work of its own
        dist.agree(before or (lambda: None), group, what="work before the bootstrap")
    return result

"""The activation-manifold explanation, measured (arXiv 2602.02343, §4: "control shifts representations along
target-concept directions to enhance preference, while utility declines primarily when interventions push
representations off the model's valid-generation manifold").

Per pair and m, at two sites (``steered``: the residual stream leaving the steered layer; ``last``: leaving the
last decoder layer), over the hidden states that score the completions (the prompt's last token and every
completion token but the last, both completions):

* **shift along the concept direction**: the mean of ``(h_m − h_0)·u``, where u is the unit vector of the mean
  difference, over pairs, between the unsteered states of the positive and of the negative completion;
* **off-manifold distance**: the mean of ``‖Q⊥(h_m − h_0)‖ / σ⊥``: Q⊥ projects onto the complement of the
  principal subspace of the unsteered states of the same pairs that holds ``variance`` (95%) of their variance,
  and σ⊥ is the unsteered states' own spread there (the RMS of ``‖Q⊥(h_0 − μ)‖``). It is 0 at m = 0 and in units
  of how far unsteered states already stray from the subspace.

The subspace and u come from every pair's unsteered states, so the measures of a pair do not depend on how the
pairs are batched. :func:`explain_utility` then asks how well the off-manifold distance predicts each pair's
utility drop (R² of a monotone fit, Spearman ρ, pair-bootstrap intervals) against |m| alone.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import dist, engines, hf
from ..data import encode_pair
from ..ops._checks import check_strengths

__all__ = ["manifold_sweep", "explain_utility", "isotonic_r2", "SITES", "COLUMNS"]

SITES = ("steered", "last")
COLUMNS = tuple(f"{k}_{s}" for s in SITES for k in ("shift", "off"))  # sweep.csv columns


@torch.no_grad()
def manifold_sweep(engine, *args, variance: float = 0.95, batch_size: int | None = None, chat: bool = True,
                   progress: bool = True, group=None) -> dict:
    """Shift along the concept direction and off-manifold distance of every pair at every m, at both sites.

    Called as ``manifold_sweep(engine, pairs, multipliers)`` on an engine that provides hidden states (the
    transformers engine; another is refused in one line naming it), or as ``manifold_sweep(model, tokenizer,
    steering, pairs, multipliers)``.

    Returns {"shift_steered", "off_steered", "shift_last", "off_last": [N, M] arrays, "subspace": {site: {"dims",
    "hidden", "spread"}}, "variance"}. Inside a process group each rank runs its shard; the unsteered states are
    gathered so every rank builds the same subspace; every rank returns the whole result.

    Example::

        >>> man = manifold_sweep(model, tok, steering, test_pairs, [-4, -2, 0, 2, 4])
        >>> man["off_last"].mean(0)        # grows with |m|
    """
    from tqdm.auto import tqdm

    engine, (pairs, multipliers) = engines.resolve(engine, args, 2, "manifold_sweep", group=group)
    engines.refuse_hidden_states(engine, "manifold_sweep")
    model, tokenizer, steering = engine.model, engine.tokenizer, engine.steering
    ms = check_strengths("multipliers", multipliers)
    if not pairs:
        raise ValueError("pairs is empty")
    if not 0 < variance < 1:
        raise ValueError(f"variance must be in (0, 1), got {variance}")
    group = engine.group
    part = dist.shard_range(len(pairs), group)
    grid = ms + ([0.0] if 0.0 not in ms else [])  # h_0 is needed whatever the sweep's grid
    zero = grid.index(0.0)
    device = next(model.parameters()).device
    layers = (steering.layer, len(hf.decoder_layers(model)) - 1)
    enc = [encode_pair(tokenizer, p, chat=chat) for p in list(pairs)[part.start:part.stop]]
    per = batch_size or max(1, (512 if device.type == "cuda" else 48) // (2 * len(grid)))
    states = []  # per local pair: {site: [G, tokens, H]} float32 on the host
    bar = tqdm(total=len(enc), desc=f"manifold ({len(grid)} m)", unit="pair", disable=not (progress and
                                                                                          dist.is_main(group)),
               leave=False)
    for s in range(0, len(enc), per):
        states += _chunk_states(model, steering, enc[s:s + per], grid, layers, hf.pad_id_of(tokenizer), device)
        bar.update(len(enc[s:s + per]))
    bar.close()
    # The unsteered states of every pair (all ranks) define u and the subspace, identically on every rank.
    unsteered = dist.all_gather_list([{k: (v[zero].numpy(), n_pos) for k, (v, n_pos) in st.items()}
                                      for st in states], group)
    basis = {site: _subspace([u[site] for u in unsteered], variance) for site in SITES}
    local = {c: np.zeros((len(states), len(ms))) for c in COLUMNS}
    cols = [grid.index(m) for m in ms]
    for i, st in enumerate(states):
        for site in SITES:
            h = st[site][0].numpy().astype(np.float64)
            b = basis[site]
            disp = h - h[zero][None]  # [G, tokens, H]
            shift = (disp @ b["u"]).mean(1)
            inside = (disp @ b["V"]) @ b["V"].T
            off = np.linalg.norm(disp - inside, axis=-1).mean(1) / b["spread"]
            local[f"shift_{site}"][i], local[f"off_{site}"][i] = shift[cols], off[cols]
    rows = dist.all_gather_list([{c: local[c][i] for c in COLUMNS} for i in range(len(states))], group)
    out = {c: np.stack([r[c] for r in rows]) for c in COLUMNS}
    out["subspace"] = {site: {"dims": int(basis[site]["V"].shape[1]), "hidden": int(basis[site]["V"].shape[0]),
                              "spread": float(basis[site]["spread"])} for site in SITES}
    out["variance"] = variance
    return out


def _chunk_states(model, steering, chunk, grid, layers, pad: int, device) -> list[dict]:
    """The states scoring each pair's two completions at every m of ``grid``: per pair {site: ([G, tokens, H],
    positive tokens)}, the positive completion's tokens first. Layers below the steered one run once per pair."""
    G, b = len(grid), len(chunk)
    rows = [p + c for p, pos, neg in chunk for c in (pos, neg)]
    ids, mask = (t.to(device) for t in hf.pad_rows(rows, pad))  # [2b, T], right-padded
    h_in = hf.capture_layer_input(model, steering.layer, ids, mask)  # [2b, T, H]: independent of m
    tile = lambda t: t.repeat(G, *[1] * (t.dim() - 1))  # rows (m, pair, side)
    m_rows = torch.tensor(grid, device=device, dtype=h_in.dtype).repeat_interleave(2 * b)
    with hf.layer_outputs(model, layers) as seen, steering.multiplier(m_rows):
        hf.last_hidden(model, tile(h_in), start=steering.layer, input_ids=tile(ids), attention_mask=tile(mask))
    out = []
    for j, (p, pos, neg) in enumerate(chunk):
        st = {}
        for site, layer in zip(SITES, layers):
            h = seen[layer].view(G, b, 2, ids.shape[1], -1)[:, j]
            # the states that predict the completion: the prompt's last token through the completion's last but one
            parts = [h[:, k, len(p) - 1:len(p) - 1 + len(c)] for k, c in enumerate((pos, neg))]
            st[site] = (torch.cat(parts, 1).float().cpu(), len(pos))
        out.append(st)
    return out


def _subspace(unsteered: list, variance: float) -> dict:
    """The concept direction u, the principal basis V [H, k] holding ``variance`` of the unsteered states' variance,
    and their spread outside it (RMS norm of the component off the subspace)."""
    X = np.concatenate([h for h, _ in unsteered]).astype(np.float64)  # [tokens, H]
    mu = X.mean(0)
    _, sv, vt = np.linalg.svd(X - mu, full_matrices=False)
    share = np.cumsum(sv ** 2) / max(float((sv ** 2).sum()), 1e-300)
    k = int(np.searchsorted(share, variance) + 1)
    V = vt[:k].T
    resid = (X - mu) - ((X - mu) @ V) @ V.T
    spread = math.sqrt(float((resid ** 2).sum(1).mean())) or 1.0
    diff = np.mean([h[:n].mean(0) - h[n:].mean(0) for h, n in unsteered], axis=0)
    u = diff / (np.linalg.norm(diff) or 1.0)
    return {"u": u, "V": V, "spread": spread}


# --- does leaving the manifold explain the utility drop? -------------------------------------------------------------

def _isotonic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The non-decreasing least-squares fit of y on x (pool-adjacent-violators; ties in x share one value)."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, inv = np.unique(xs, return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    v = np.bincount(inv, weights=ys) / w
    blocks = []  # [value, weight, count]
    for vi, wi in zip(v, w):
        blocks.append([vi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b2, b1 = blocks.pop(), blocks.pop()
            wt = b1[1] + b2[1]
            blocks.append([(b1[0] * b1[1] + b2[0] * b2[1]) / wt, wt, b1[2] + b2[2]])
    fitted = np.concatenate([[val] * cnt for val, _, cnt in blocks])
    out = np.empty_like(ys)
    out[order] = fitted[inv]
    return out


def isotonic_r2(x, y) -> float:
    """R² of the monotone (non-decreasing) least-squares fit of y on x."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - _isotonic(x, y)) ** 2).sum()) / ss if ss > 0 else float("nan")


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(np.ravel(x), np.ravel(y)).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


def explain_utility(sweep, *, bootstrap: int = 200, seed: int = 0) -> dict:
    """How well the off-manifold distance predicts each pair's utility drop ``U(0) − U(m)``, against |m| alone, at
    each site: R² of a monotone fit and Spearman ρ, each with a pair-bootstrap 95% interval, and the interval of
    their difference (off-manifold minus |m|). Needs a sweep with the manifold columns (``sweep --manifold``)."""
    extra = sweep.extra or {}
    missing = [c for c in COLUMNS if c not in extra]
    if missing:
        raise ValueError(f"the sweep has no manifold columns {missing}: sweep with --manifold")
    ms = sweep.multipliers
    order = np.argsort(ms)
    u0 = np.array([np.interp(0.0, ms[order], row[order]) for row in sweep.util_odds])
    drop = u0[:, None] - sweep.util_odds  # [N, M]
    absm = np.broadcast_to(np.abs(ms)[None], drop.shape)
    N = drop.shape[0]
    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, N, N) for _ in range(bootstrap)]

    def scores(x, idx=None):
        xs, ys = (x, drop) if idx is None else (x[idx], drop[idx])
        return isotonic_r2(xs, ys), _spearman(xs, ys)

    def interval(v):
        v = np.asarray([a for a in v if np.isfinite(a)])
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None
    out = {"definition": "utility drop U(0) − U(m) per (pair, m); predictors: the off-manifold distance at the site, "
                         "and |m|; R² of a monotone (isotonic) fit and Spearman ρ; 95% pair-bootstrap intervals",
           "bootstrap": bootstrap}
    base = [scores(absm, idx) for idx in resamples]
    r2_m, rho_m = scores(absm)
    for site in SITES:
        x = extra[f"off_{site}"]
        r2, rho = scores(x)
        boot = [scores(x, idx) for idx in resamples]
        d_r2 = interval([a[0] - b[0] for a, b in zip(boot, base)])
        d_rho = interval([a[1] - b[1] for a, b in zip(boot, base)])
        rho_ci = interval([b[1] for b in boot])
        rises = rho_ci is not None and rho_ci[1] < 0  # the monotone fit assumes a fall; read the sign first
        verdict = (f"utility rises, not falls, as the off-manifold distance grows (Spearman ρ {rho:+.2f}, 95% "
                   f"{rho_ci[0]:+.2f} to {rho_ci[1]:+.2f}): there is no drop to explain" if rises else
                   "neither explains the drop (monotone R² below 0.1 for both)" if max(r2, r2_m) < 0.1 else
                   "the off-manifold distance predicts the drop better than |m|" if d_r2 and d_r2[0] > 0 else
                   "|m| predicts the drop better than the off-manifold distance" if d_r2 and d_r2[1] < 0 else
                   "neither predicts the drop better (the interval of the R² difference contains 0)")
        out[site] = {"off_manifold": {"r2_monotone": r2, "r2_interval": interval([b[0] for b in boot]),
                                      "spearman": rho, "spearman_interval": rho_ci},
                     "abs_m": {"r2_monotone": r2_m, "r2_interval": interval([b[0] for b in base]),
                               "spearman": rho_m, "spearman_interval": interval([b[1] for b in base])},
                     "difference": {"r2": d_r2, "spearman": d_rho}, "verdict": verdict}
    return out

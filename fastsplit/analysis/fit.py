"""The paper's curve fits over steering strength m (arXiv 2602.02343, §4).

Validity decay, separate for m ≥ 0 and m < 0 and continuous at m = 0:
    D(m) = (1 + (m − m±)² / L±)^(−p±)
Preference:  (α·m + β)·D_p(m) + b_p          Utility:  β_u·D_u(m) + b_u
Fitted by least squares with scipy's SLSQP (continuity as an equality constraint, L > 0 and p > 0 as
bounds) from several seeded starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Fit", "OperatingPoint", "fit_curves", "operating_point", "validity_decay"]

KINDS = ("preference", "utility")
_DECAY = ("m_pos", "L_pos", "p_pos", "m_neg", "L_neg", "p_neg")
_NAMES = {"preference": ("alpha", "beta", "b") + _DECAY, "utility": ("beta", "b") + _DECAY}
MIN_POINTS = 9


def validity_decay(m, m_pos, L_pos, p_pos, m_neg, L_neg, p_neg):
    """D(m): the rational-quadratic decay, one branch per sign of m."""
    m = np.asarray(m, dtype=np.float64)
    pos = (1.0 + (m - m_pos) ** 2 / L_pos) ** (-p_pos)
    neg = (1.0 + (m - m_neg) ** 2 / L_neg) ** (-p_neg)
    return np.where(m >= 0, pos, neg)


def _model(kind: str, theta: np.ndarray, m) -> np.ndarray:
    if kind == "preference":
        alpha, beta, b = theta[:3]
        return (alpha * np.asarray(m, np.float64) + beta) * validity_decay(m, *theta[3:]) + b
    beta, b = theta[:2]
    return beta * validity_decay(m, *theta[2:]) + b


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


@dataclass
class Fit:
    """A fitted curve: ``params`` by name, ``r2`` on the fitted points, ``r2_test`` on a holdout (or None),
    and for preference ``regions``: the linear / transitional / convergence m ranges on each side."""

    kind: str
    params: dict[str, float]
    r2: float
    r2_test: float | None = None
    regions: dict | None = None
    m_range: tuple[float, float] = (0.0, 0.0)
    _theta: np.ndarray = field(default=None, repr=False)

    def predict(self, m) -> np.ndarray:
        return _model(self.kind, self._theta, m)

    def score(self, multipliers, values) -> float:
        """R² = 1 − SS_res/SS_tot of this fit on other points (e.g. a test split)."""
        m, y = _prepare(multipliers, values, min_points=2)
        return _r2(y, self.predict(m))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "r2": self.r2, "r2_test": self.r2_test,
                "regions": self.regions, "m_range": list(self.m_range)}


def _prepare(multipliers, values, min_points=MIN_POINTS):
    m = np.asarray(multipliers, dtype=np.float64).reshape(-1)
    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 2:  # [N, M] per pair: the curve is fitted to the per-m means
        if y.shape[1] != m.shape[0]:
            raise ValueError(f"values has shape {y.shape} but there are {m.shape[0]} multipliers")
        y = y.mean(axis=0)
    y = y.reshape(-1)
    if m.shape != y.shape:
        raise ValueError(f"multipliers ({m.shape[0]}) and values ({y.shape[0]}) differ in length")
    if m.shape[0] < min_points:
        raise ValueError(f"a fit needs at least {min_points} points, got {m.shape[0]}")
    if not (np.isfinite(m).all() and np.isfinite(y).all()):
        raise ValueError("multipliers and values must be finite (found NaN or inf)")
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        raise ValueError("values are constant: there is no curve to fit")
    return m, y


def _regions(fit: Fit, m_lo: float, m_hi: float, *, linear_tol=0.25, flat_tol=0.1) -> dict | None:
    """Region boundaries from the fitted slope s(m): linear while |s − s(0)| ≤ 25%·|s(0)|, convergence
    once |s| ≤ 10%·|s(0)|, transitional between. A boundary past the swept range is None."""
    eps = 1e-4 * max(1.0, m_hi - m_lo)
    slope = lambda m: (fit.predict(m + eps) - fit.predict(m - eps)) / (2 * eps)
    s0 = float(slope(np.array([0.0]))[0])
    if abs(s0) < 1e-12:
        return None
    out = {}
    for side, end in (("positive", m_hi), ("negative", m_lo)):
        if end * (1 if side == "positive" else -1) <= 0:
            out[side] = None
            continue
        grid = np.linspace(0.0, end, 2001)
        s = slope(grid)
        lin = np.nonzero(np.abs(s - s0) > linear_tol * abs(s0))[0]
        flat = np.nonzero(np.abs(s) <= flat_tol * abs(s0))[0]
        b1 = float(grid[lin[0]]) if lin.size else None
        b2 = float(grid[flat[0]]) if flat.size else None
        out[side] = {"linear": [0.0, b1], "transitional": [b1, b2] if b1 is not None else None,
                     "convergence": [b2, float(end)] if b2 is not None else None}
    return out


def fit_curves(multipliers, values, kind: str = "preference", *, holdout=None, restarts: int = 16,
               seed: int = 0) -> Fit:
    """Fit the paper's preference or utility curve to ``values`` over ``multipliers``.

    ``values`` is [M] or [N, M] (per pair; the per-m means are fitted). ``holdout=(multipliers, values)``
    scores the fit on another split (``r2_test``). At least 9 points, all finite, not constant.

    Example::

        >>> fit = fit_curves(sweep.multipliers, sweep.pref_odds, "preference")
        >>> fit.r2, fit.regions["positive"]["linear"]
    """
    from scipy.optimize import minimize

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    m, y = _prepare(multipliers, values)
    scale = float(np.abs(m).max()) or 1.0
    var = float(y.var())
    n_lin = 3 if kind == "preference" else 2

    def objective(theta):
        return float(((_model(kind, theta, m) - y) ** 2).mean()) / var

    def continuity(theta):  # D₊(0) = D₋(0), in log form
        mp, Lp, pp, mn, Ln, pn = theta[n_lin:]
        return pp * math.log1p(mp * mp / Lp) - pn * math.log1p(mn * mn / Ln)

    decay_bounds = [(-3 * scale, 3 * scale), (1e-4 * scale ** 2, 1e4 * scale ** 2), (1e-3, 20.0)] * 2
    bounds = [(None, None)] * n_lin + decay_bounds
    rng = np.random.default_rng(seed)
    near = np.abs(m) <= np.quantile(np.abs(m), 0.5)
    slope0 = float(np.polyfit(m[near], y[near], 1)[0]) if near.sum() >= 2 else 0.0
    best = None
    for k in range(restarts):
        decay = []
        for _ in range(2):
            decay += [rng.uniform(-0.3, 0.3) * scale if k else 0.0,
                      float(np.exp(rng.uniform(math.log(0.05), math.log(5.0)))) * scale ** 2 if k else scale ** 2,
                      rng.uniform(0.3, 3.0) if k else 1.0]
        if kind == "preference":
            lin = [slope0 * rng.uniform(0.5, 2.0) if k else slope0, rng.normal() * y.std() * 0.1, float(np.median(y))]
        else:
            lin = [float(np.ptp(y)) * rng.uniform(0.5, 1.5), float(y.min())]
        x0 = np.array(lin + decay)
        res = minimize(objective, x0, method="SLSQP", bounds=bounds,
                       constraints=[{"type": "eq", "fun": continuity}], options={"maxiter": 500, "ftol": 1e-12})
        if res.success or res.status in (8, 9):  # keep usable iterates; the best objective wins below
            if abs(continuity(res.x)) < 1e-6 and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise RuntimeError(f"the {kind} fit did not converge from {restarts} starts")
    theta = best.x
    fit = Fit(kind, dict(zip(_NAMES[kind], map(float, theta))), _r2(y, _model(kind, theta, m)),
              m_range=(float(m.min()), float(m.max())), _theta=theta)
    if kind == "preference":
        fit.regions = _regions(fit, float(m.min()), float(m.max()))
    if holdout is not None:
        fit.r2_test = fit.score(*holdout)
    return fit


@dataclass
class OperatingPoint:
    multiplier: float
    preference: float
    utility: float
    utility_at_zero: float

    def to_dict(self) -> dict:
        return {"multiplier": self.multiplier, "preference": self.preference, "utility": self.utility,
                "utility_at_zero": self.utility_at_zero}


def operating_point(pref_fit: Fit, util_fit: Fit, *, max_util_drop: float = 1.0, grid: int = 4001) -> OperatingPoint:
    """The m in the swept range that maximises fitted preference while fitted utility stays within
    ``max_util_drop`` of its value at m = 0; returns it with both fitted values there."""
    if pref_fit.kind != "preference" or util_fit.kind != "utility":
        raise ValueError("operating_point takes a preference fit and a utility fit, in that order")
    if not max_util_drop >= 0:
        raise ValueError(f"max_util_drop must be >= 0, got {max_util_drop}")
    lo = max(pref_fit.m_range[0], util_fit.m_range[0])
    hi = min(pref_fit.m_range[1], util_fit.m_range[1])
    ms = np.union1d(np.linspace(lo, hi, grid), [0.0] if lo <= 0 <= hi else [])
    u0 = float(util_fit.predict(np.array([0.0]))[0])
    util = util_fit.predict(ms)
    pref = pref_fit.predict(ms)
    ok = util >= u0 - max_util_drop
    if not ok.any():
        raise ValueError("no swept m keeps utility within max_util_drop of its value at m = 0")
    i = int(np.argmax(np.where(ok, pref, -np.inf)))
    return OperatingPoint(float(ms[i]), float(pref[i]), float(util[i]), u0)


def analyze(sweep, *, max_util_drop: float = 1.0, seed: int = 0) -> dict:
    """Both fits on all pairs, a split-half check (fit on even pairs, score on odd ones), the operating point.

    Returns {"preference": Fit, "utility": Fit, "operating_point": OperatingPoint,
    "split_half": {kind: {"r2_train", "r2_test"}}} (split_half is empty with fewer than 4 pairs).
    """
    m = sweep.multipliers
    pref = fit_curves(m, sweep.pref_odds, "preference", seed=seed)
    util = fit_curves(m, sweep.util_odds, "utility", seed=seed)
    halves = {}
    if sweep.pref_odds.shape[0] >= 4:
        for kind, vals in (("preference", sweep.pref_odds), ("utility", sweep.util_odds)):
            f = fit_curves(m, vals[::2], kind, holdout=(m, vals[1::2].mean(0)), seed=seed)
            halves[kind] = {"r2_train": f.r2, "r2_test": f.r2_test}
    return {"preference": pref, "utility": util, "split_half": halves,
            "operating_point": operating_point(pref, util, max_util_drop=max_util_drop)}

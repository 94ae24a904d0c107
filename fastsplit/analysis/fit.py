"""The paper's curve fits over steering strength m (arXiv 2602.02343, §4), as the paper states them.

Validity decay, one branch per sign of m, each **normalised to 1 at m = 0** (so the curve is continuous at 0
by construction, with no constraint between the sides)::

    D±(m) = (1 + (m − m±)² / L±)^(−p±) / (1 + m±² / L±)^(−p±)

Preference  P(m) = (α·m + β)·D(m) + b        Utility  U(m) = β_u·D(m) + b_u

**Parameterisation.** β and b cancel (U(0) = β_u + b_u is what the data pin down, while β_u alone can run off
to thousands with b_u following it), so the fit works in the value at 0 instead: ``p0 = β + b`` and
``u0 = β_u + b_u``, i.e. P(m) = α·m·D(m) + β·(D(m) − 1) + p0 and U(m) = u0 + β_u·(D(m) − 1). The report also
gives the well-determined amplitudes A± = β_u·p± (only their product matters while D stays near 1).

**Optimiser.** Given the six decay parameters the model is linear in the rest, so a grid over the decay
parameters with the linear ones solved exactly (variable projection) finds the basin; the best grid points
start bounded least squares (scipy ``least_squares``, trust region, analytic Jacobian) over all parameters. Only converged runs
count; a parameter within 0.1% of a bound is reported in ``Fit.at_bounds``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .. import dist

__all__ = ["Fit", "OperatingPoint", "fit_curves", "fit_many", "operating_point", "simpler_member", "validity_decay", "MIN_POINTS"]

KINDS = ("preference", "utility")
_DECAY = ("m_pos", "L_pos", "p_pos", "m_neg", "L_neg", "p_neg")
_NAMES = {"preference": ("alpha", "beta", "p0") + _DECAY, "utility": ("u0", "beta") + _DECAY}
MIN_POINTS = 9
P_BOUNDS = (1e-3, 20.0)
_GRID = {"m": (-0.3, 0.0, 0.3), "L": (0.01, 0.1, 1.0, 10.0), "p": (0.05, 0.5, 2.0, 8.0)}  # m, L in scale units
_STARTS = 6
# Refits started from the full fit (bootstrap resamples, held-out m) stop at this tolerance: their R² and m_op are
# read to 3-4 digits, which it leaves unchanged (measured on a 64-pair sweep: the same intervals to 4 digits), at
# about half the function evaluations of 1e-9 (71k against 133k).
REFIT_TOL = 1e-6


def _branch(m, centre, L, p):
    """One side's normalised decay (1 at m = 0), from logs so a large p or L stays finite."""
    return np.exp(-p * (np.log1p((m - centre) ** 2 / L) - np.log1p(centre ** 2 / L)))


def validity_decay(m, m_pos, L_pos, p_pos, m_neg, L_neg, p_neg):
    """D(m): the rational-quadratic decay, one branch per sign of m, each normalised to D(0) = 1."""
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 0, _branch(m, m_pos, L_pos, p_pos), _branch(m, m_neg, L_neg, p_neg))


def _model(kind: str, params: np.ndarray, m) -> np.ndarray:
    m = np.asarray(m, np.float64)
    d = validity_decay(m, *params[-6:])
    if kind == "preference":
        alpha, beta, p0 = params[:3]
        return alpha * m * d + beta * (d - 1.0) + p0
    u0, beta = params[:2]
    return u0 + beta * (d - 1.0)


def _columns(kind: str, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The model's linear columns given decay values d [..., M]: P = [m·d, d − 1, 1]·(α, β, p0)."""
    ones = np.ones_like(d)
    if kind == "preference":
        return np.stack([m * d, d - 1.0, ones], axis=-1)
    return np.stack([ones, d - 1.0], axis=-1)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


@dataclass
class Fit:
    """A fitted curve: ``params`` by name (with the value at 0: ``p0`` or ``u0``; utility also ``A_pos``,
    ``A_neg``), ``r2`` on the fitted points, ``at_bounds`` (parameters within 0.1% of a bound), ``restarts``
    (converged local runs; 0 means none converged and the best iterate is shown, flagged by ``converged``),
    ``not_identified`` ({name: reason}: on a bound, or a standard error too large for the data to pin it),
    ``std_errors`` (in the search space: log L, log p), ``bic``, ``member`` ("full", or the simpler member of the
    family it is) and, for preference, ``regions``: the linear / transitional / convergence m ranges, and
    "reversal" where the fitted slope has turned against its sign at m = 0."""

    kind: str
    params: dict[str, float]
    r2: float
    at_bounds: list[str] = field(default_factory=list)
    restarts: int = 0
    regions: dict | None = None
    m_range: tuple[float, float] = (0.0, 0.0)
    not_identified: dict[str, str] = field(default_factory=dict)
    std_errors: dict[str, float] = field(default_factory=dict)
    bic: float = float("nan")
    member: str = "full"
    _params: np.ndarray = field(default=None, repr=False)

    @property
    def converged(self) -> bool:
        return self.restarts > 0

    def predict(self, m) -> np.ndarray:
        return _model(self.kind, self._params, m)

    def score(self, multipliers, values) -> float:
        """R² = 1 − SS_res/SS_tot of this fit on other points."""
        m, y = _prepare(multipliers, values, min_points=2)
        return _r2(y, self.predict(m))

    @property
    def identified(self) -> bool:
        return not self.not_identified

    def to_dict(self) -> dict:
        return {"kind": self.kind, "member": self.member, "params": self.params, "r2": self.r2,
                "converged": self.converged, "at_bounds": self.at_bounds,
                "not_identified": self.not_identified, "std_errors": self.std_errors, "bic": self.bic,
                "restarts": self.restarts, "regions": self.regions, "m_range": list(self.m_range)}


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


def _bounds(kind: str, scale: float, y: np.ndarray):
    span = max(float(np.ptp(y)), 1e-6)
    big = 1e6 * span
    lin = [(-big / scale, big / scale), (-big, big), (-big, big)] if kind == "preference" else [(-big, big), (-big, big)]
    decay = [(-3 * scale, 3 * scale), (1e-4 * scale ** 2, 1e4 * scale ** 2), P_BOUNDS] * 2
    lo, hi = zip(*(lin + decay))
    return np.array(lo), np.array(hi)


def _projected(kind: str, m: np.ndarray, y: np.ndarray, side: list[tuple]):
    """For every pair of decay parameters from ``side`` (positive × negative), the linear parameters solved
    exactly (variable projection). Yields (sse [S], linear [S, n], negative-side index) per negative side."""
    dp = np.array([_branch(m, *s) for s in side])  # [S, M]: every positive side at once
    for j, sn in enumerate(side):
        d = np.where((m >= 0)[None], dp, _branch(m, *sn)[None])
        X = _columns(kind, m[None], d)  # [S, M, n]
        XtX = np.einsum("smi,smj->sij", X, X) + 1e-12 * np.eye(X.shape[-1])
        lin = np.linalg.solve(XtX, np.einsum("smi,m->si", X, y)[..., None])[..., 0]
        yield ((np.einsum("smi,si->sm", X, lin) - y) ** 2).sum(1), lin, j


def _grid_starts(kind: str, m: np.ndarray, y: np.ndarray, scale: float, k: int) -> list[np.ndarray]:
    """The k best points of a coarse grid over the decay parameters, with the linear ones solved exactly."""
    side = [(c * scale, L * scale ** 2, p) for c, L, p in itertools.product(_GRID["m"], _GRID["L"], _GRID["p"])]
    best = []
    for sse, lin, j in _projected(kind, m, y, side):
        for i in np.argsort(sse)[:k]:
            best.append((float(sse[i]), np.concatenate([lin[i], side[i], side[j]])))
    best.sort(key=lambda t: t[0])
    return [x for _, x in best[:k]]


_LOGS = np.array([False] * 3 + [False, True, True] * 2)  # L± and p± are searched in log space


def _to_search(x: np.ndarray, n_lin: int) -> np.ndarray:
    """Model parameters -> search space: log L, log p. The decay's flat valley (L and p growing together
    towards a Gaussian) is then a straight line the solver walks to the bound, not a crawl."""
    z = np.array(x, np.float64)
    logs = _LOGS[3 - n_lin:]
    z[logs] = np.log(z[logs])
    return z


def _from_search(z: np.ndarray, n_lin: int) -> np.ndarray:
    x = np.array(z, np.float64)
    logs = _LOGS[3 - n_lin:]
    x[logs] = np.exp(x[logs])
    return x


def _branch_grad(m, centre, L, p):
    """A branch's value d and its derivatives in the search space: ∂d/∂centre, ∂d/∂log L, ∂d/∂log p.
    With g = log1p((m − c)²/L) − log1p(c²/L) and d = exp(−p·g)."""
    u, c2 = (m - centre) ** 2, centre ** 2
    g = np.log1p(u / L) - np.log1p(c2 / L)
    d = np.exp(-p * g)
    dg_dc = -2.0 * (m - centre) / (L + u) - 2.0 * centre / (L + c2)
    dg_dlogL = -u / (L + u) + c2 / (L + c2)
    return d, -p * d * dg_dc, -p * d * dg_dlogL, -p * g * d


def _jacobian(kind: str, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """∂model/∂z [M, n] in the search space (log L, log p): analytic, so one evaluation per solver step instead
    of one per parameter (the finite-difference Jacobian was 90% of the fit time)."""
    pos = m >= 0
    grads = [_branch_grad(m, *x[-6:-3]), _branch_grad(m, *x[-3:])]
    d = np.where(pos, grads[0][0], grads[1][0])
    if kind == "preference":
        alpha, beta = x[0], x[1]
        lin = [m * d, d - 1.0, np.ones_like(m)]
        amp = alpha * m + beta
    else:
        lin = [np.ones_like(m), d - 1.0]
        amp = np.full_like(m, x[1])
    decay = [np.where(side, g, 0.0) * amp for gr, side in zip(grads, (pos, ~pos)) for g in gr[1:]]
    return np.stack(lin + decay, axis=1)


def _local(kind, m, y, x0, lo, hi, fixed: dict | None = None, tol: float = 1e-9):
    """One bounded least-squares run from ``x0``; ``fixed`` {index: model-space value} holds parameters out of
    the search (a simpler member of the family). Returns (cost, x, z, zlo, zhi, converged) over all parameters."""
    from scipy.optimize import least_squares

    n_lin = len(_NAMES[kind]) - 6
    fixed = fixed or {}
    free = np.array([i for i in range(len(x0)) if i not in fixed])
    zlo, zhi = _to_search(lo, n_lin), _to_search(hi, n_lin)
    with np.errstate(divide="ignore"):  # a fixed p = 0 has no log; it is overwritten in full() anyway
        z0 = np.clip(_to_search(x0, n_lin), zlo + 1e-9 * (zhi - zlo), zhi - 1e-9 * (zhi - zlo))

    def full(zf):
        z = z0.copy()
        z[free] = zf
        x = _from_search(z, n_lin)
        for i, v in fixed.items():
            x[i] = v
        return x

    res = least_squares(lambda zf: _model(kind, full(zf), m) - y, z0[free], bounds=(zlo[free], zhi[free]),
                        method="trf", jac=lambda zf: _jacobian(kind, full(zf), m)[:, free],
                        x_scale="jac", xtol=tol, ftol=tol, gtol=tol, max_nfev=5000)
    if res.status < 0 or not np.isfinite(res.cost):
        return None
    x = full(res.x)
    z = z0.copy()
    z[free] = res.x
    return res.cost, x, z, zlo, zhi, res.status > 0


def _solve(kind: str, m: np.ndarray, y: np.ndarray, starts: list[np.ndarray], fixed: dict | None = None,
           tol: float = 1e-9, group=None):
    lo, hi = _bounds(kind, float(np.abs(m).max()) or 1.0, y)
    # Inside a process group the starts are shared out (each is deterministic: the gathered runs are one process's).
    local = dist.run_tasks(lambda i: _local(kind, m, y, starts[i], lo, hi, fixed, tol), len(starts), group,
                           what=f"{kind} fit")
    return _best(kind, local, len(starts), fixed)


def _best(kind: str, local: list, n_starts: int, fixed: dict | None = None):
    """The best converged run of ``local`` (one per start; None where a run failed): (x, at_bounds, runs)."""
    tried = [r for r in local if r is not None]
    if not tried:
        raise RuntimeError(f"the {kind} fit failed from all {n_starts} starts")
    runs = [r for r in tried if r[-1]] or tried  # converged runs only, unless none converged (then flagged)
    _, x, z, zlo, zhi, converged = min(runs, key=lambda r: r[0])
    tol = 1e-3 * (zhi - zlo)  # 0.1% of each range, in the search space (log for L and p)
    at = [n for i, (n, v, a, b, t) in enumerate(zip(_NAMES[kind], z, zlo, zhi, tol))
          if i not in (fixed or {}) and n.startswith(("m_", "L_", "p_")) and (v - a < t or b - v < t)]
    return x, at, len(runs) if converged else 0


_AMPLITUDE_REACH = 100.0


def _identifiability(kind, m, y, x, at, fixed) -> tuple[dict, dict, float]:
    """(not identified {name: reason}, standard errors {name: se in the search space}, BIC) of a fit.

    Standard errors from the Jacobian at the optimum, σ²·(JᵀJ)⁺ with σ² = SSE/(points − free parameters), in the
    search space (log L, log p). A parameter is not identified when it sits on a bound, or when its standard
    error exceeds what would pin it: the larger of |value| and the data's range for the linear parameters, the
    swept range for the centres m±, a factor of e (1 in log space) for L± and p±; and an amplitude (β, α over the
    swept range, utility's A± = β·p±) over 100x the data's range is one that props up a decay on its bound."""
    n_lin = len(_NAMES[kind]) - 6
    free = [i for i in range(len(x)) if i not in (fixed or {})]
    resid = _model(kind, x, m) - y
    sse = float((resid ** 2).sum())
    M, k = len(m), len(free)
    bic = M * math.log(max(sse, 1e-300) / M) + k * math.log(M)
    out: dict[str, str] = {name: "on its bound" for name in at}
    if M <= k:
        return {**{_NAMES[kind][i]: "more parameters than points" for i in free}, **out}, {}, bic
    J = _jacobian(kind, x, m)[:, free]
    with np.errstate(all="ignore"):
        cov = np.linalg.pinv(J.T @ J) * sse / (M - k)
        se = np.sqrt(np.abs(np.diag(cov)))
    span = float(np.ptp(y)) or 1.0
    scale = float(np.abs(m).max()) or 1.0
    with np.errstate(divide="ignore"):
        z = _to_search(x, n_lin)
    errors = {}
    for j, i in enumerate(free):
        name, e = _NAMES[kind][i], float(se[j])
        errors[name] = e
        limit = max(abs(float(z[i])), span) if i < n_lin else scale if name.startswith("m_") else 1.0
        if name not in out and not (math.isfinite(e) and e <= limit):
            what = "its log" if name.startswith(("L_", "p_")) else "it"
            out[name] = f"standard error {e:.3g} of {what} against {limit:.3g}: the data do not determine it"
    # An amplitude far beyond the data's range is compensating a decay that ran to a bound: its value (and the
    # A± = β·p± it makes) is the bound's, not the data's, however small its standard error.
    reach = _AMPLITUDE_REACH * span
    amps = {"beta": float(x[1])}
    if kind == "preference":
        amps["alpha"] = float(x[0]) * scale
    else:
        amps.update(A_pos=float(x[1] * x[-4]), A_neg=float(x[1] * x[-1]))
    for name, value in amps.items():
        if name not in out and abs(value) > reach:
            out[name] = (f"|{name}| = {abs(value):.3g} is over {_AMPLITUDE_REACH:g}x the data's range ({span:.3g}): "
                         "it compensates a decay parameter on its bound")
    return out, errors, bic


# Simpler members of the family: a side without decay (D = 1 there: its centre and width then mean nothing and are
# fixed too), or no decay at all (a straight preference line, a constant utility; β then multiplies zero).
def _members(kind: str, scale: float) -> dict[str, dict]:
    names = _NAMES[kind]
    flat = lambda side: {names.index(f"m_{side}"): 0.0, names.index(f"L_{side}"): scale ** 2,
                         names.index(f"p_{side}"): 0.0}
    return {"no decay for m > 0": flat("pos"), "no decay for m < 0": flat("neg"),
            "no decay": {**flat("pos"), **flat("neg"), names.index("beta"): 0.0}}


def simpler_member(fit: "Fit", multipliers, values, *, delta_bic: float = 2.0) -> "Fit | None":
    """A simpler member of the paper's family that fits as well as ``fit`` (its BIC at most ``delta_bic`` above:
    a difference "not worth more than a bare mention"; with as many parameters as points, its R² within 0.02),
    fewest parameters first; None when ``fit`` is identified or no simpler member fits as well.

    Example::

        >>> simple = simpler_member(fit, sweep.multipliers, sweep.util_odds)
        >>> simple.member if simple else "full"
    """
    if fit.identified:
        return None
    m, y = _prepare(multipliers, values)
    scale = float(np.abs(m).max()) or 1.0
    saturated = len(_NAMES[fit.kind]) >= len(m)  # as many parameters as points: BIC says nothing, compare R²
    found = []
    for member, fixed in _members(fit.kind, scale).items():
        start = fit._params.copy()
        for i, v in fixed.items():
            start[i] = v
        try:
            x, at, runs = _solve(fit.kind, m, y, [start], fixed)
        except RuntimeError:
            continue
        simple = _make_fit(fit.kind, m, y, x, at, runs, fixed=fixed, member=member)
        if (simple.r2 >= fit.r2 - 0.02) if saturated else (simple.bic <= fit.bic + delta_bic):
            found.append((len(fixed), -simple.bic, simple))
    return max(found, key=lambda t: (t[0], t[1]))[2] if found else None


def _make_fit(kind, m, y, params, at, runs, *, fixed=None, member="full") -> Fit:
    named = dict(zip(_NAMES[kind], map(float, params)))
    if kind == "utility":
        named["A_pos"], named["A_neg"] = named["beta"] * named["p_pos"], named["beta"] * named["p_neg"]
    unknown, errors, bic = _identifiability(kind, m, y, np.asarray(params, np.float64), at, fixed)
    fit = Fit(kind, named, _r2(y, _model(kind, params, m)), at_bounds=at, restarts=runs,
              m_range=(float(m.min()), float(m.max())), not_identified=unknown, std_errors=errors, bic=bic,
              member=member, _params=np.asarray(params, np.float64))
    if kind == "preference":
        fit.regions = _regions(fit, float(m.min()), float(m.max()))
    return fit


def fit_curves(multipliers, values, kind: str = "preference", *, starts: int = _STARTS, init: Fit | None = None,
               tol: float = 1e-9, group=None) -> Fit:
    """Fit the paper's preference or utility curve to ``values`` over ``multipliers``.

    ``values`` is [M] or [N, M] (per pair; the per-m means are fitted). At least 9 points, all finite, not
    constant. ``starts`` is how many grid points start a local least-squares run; ``init`` (an earlier fit of
    the same kind) adds its parameters as a start, so refits on resampled or held-out data can use
    ``starts=0``. ``tol`` is the least-squares stopping tolerance (relative change of the cost, the parameters and
    the gradient's scale); refits whose figures are read to a few digits (the bootstrap, held-out m) use
    :data:`REFIT_TOL`, about half the work. ``group``: a process group whose ranks all make this call; they share
    out the starts (the fit is one process's, bit for bit). None (the default, not the active group): this process
    alone, as inside a task that is already shared out.

    Example::

        >>> fit = fit_curves(sweep.multipliers, sweep.pref_odds, "preference")
        >>> fit.r2, fit.at_bounds, fit.regions["positive"]["linear"]
    """
    return fit_many([(multipliers, values, kind)], starts=starts, init=[init], tol=tol, group=group)[0]


def fit_many(jobs, *, starts: int = _STARTS, init=None, tol: float = 1e-9, group=None) -> list[Fit]:
    """:func:`fit_curves` of every ``(multipliers, values, kind)`` in ``jobs``, the same fits, with all their starts
    in one pool: inside a process group the ranks share out the starts of every fit at once (one collective, not
    one per fit). Fits whose starts take unequal time (the preference fit's take about three times the utility
    fit's) then balance across the ranks, where fits in a row would leave a rank idle at the end of each.
    ``init``: None or one earlier fit (or None) per job. Put the slower fit first: starts are handed out in order.

    Example::

        >>> pref, util = fit_many([(ms, sweep.pref_odds, "preference"), (ms, sweep.util_odds, "utility")])
    """
    init = [None] * len(jobs) if init is None else list(init)
    if len(init) != len(jobs):
        raise ValueError(f"init has {len(init)} entries for {len(jobs)} jobs")
    if not (isinstance(tol, float) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    plans = []
    for (multipliers, values, kind), first in zip(jobs, init):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(starts, bool) or not isinstance(starts, int) or starts < (0 if first is not None else 1):
            raise ValueError(f"starts must be a positive int (or 0 with init), got {starts!r}")
        m, y = _prepare(multipliers, values)
        scale = float(np.abs(m).max()) or 1.0
        x0 = ([first._params] if first is not None else []) + (_grid_starts(kind, m, y, scale, starts) if starts
                                                               else [])
        plans.append((kind, m, y, x0, *_bounds(kind, scale, y)))
    tasks = [(j, x0) for j, plan in enumerate(plans) for x0 in plan[3]]

    def run(i):
        j, x0 = tasks[i]
        kind, m, y, _, lo, hi = plans[j]
        return _local(kind, m, y, x0, lo, hi, None, tol)
    what = " and ".join(p[0] for p in plans) + " fit" + ("s" if len(plans) > 1 else "")
    local = dist.run_tasks(run, len(tasks), group, what=what)
    fits = []
    for j, (kind, m, y, x0, _, _) in enumerate(plans):
        mine = [r for (k, _), r in zip(tasks, local) if k == j]
        fits.append(_make_fit(kind, m, y, *_best(kind, mine, len(x0))))
    return fits


def brute_force_sse(multipliers, values, kind: str, *, points: int = 7) -> float:
    """The best sum of squared errors over a dense grid of the decay parameters (linear ones solved exactly):
    a reference optimum that a fit must not score below (tests)."""
    m, y = _prepare(multipliers, values)
    scale = float(np.abs(m).max()) or 1.0
    side = list(itertools.product(np.linspace(-0.5, 0.5, points) * scale, np.geomspace(1e-3, 1e2, points) * scale ** 2,
                                  np.geomspace(0.02, 15.0, points)))
    return min(float(sse.min()) for sse, _, _ in _projected(kind, m, y, side))


def _regions(fit: Fit, m_lo: float, m_hi: float, *, linear_tol=0.25, flat_tol=0.1) -> dict | None:
    """Region boundaries from the fitted slope s(m): linear while |s − s(0)| ≤ 25%·|s(0)|, convergence
    once |s| ≤ 10%·|s(0)|, transitional between. A boundary past the swept range is None."""
    eps = 1e-4 * max(1.0, m_hi - m_lo)
    slope = lambda m: (fit.predict(m + eps) - fit.predict(m - eps)) / (2 * eps)
    out = {}
    for side, end in (("positive", m_hi), ("negative", m_lo)):
        sign = 1 if side == "positive" else -1
        if end * sign <= 0:
            out[side] = None
            continue
        s0 = float(slope(np.array([sign * eps * 2]))[0])  # the slope just inside this side
        if abs(s0) < 1e-12:
            out[side] = None
            continue
        grid = np.linspace(0.0, end, 2001)
        s = slope(grid)
        # Past the point where the slope turns against its sign at 0 the curve heads back: not a convergence.
        turned = np.nonzero(s * np.sign(s0) < -flat_tol * abs(s0))[0]
        stop = int(turned[0]) if turned.size else len(grid)
        lin = np.nonzero(np.abs(s[:stop] - s0) > linear_tol * abs(s0))[0]
        flat = np.nonzero(np.abs(s[:stop]) <= flat_tol * abs(s0))[0]
        b1 = float(grid[lin[0]]) if lin.size else None
        b2 = float(grid[flat[0]]) if flat.size else None
        b3 = float(grid[stop]) if stop < len(grid) else None
        out[side] = {"linear": [0.0, b1 if b1 is not None else b3],
                     "transitional": [b1, b2 if b2 is not None else b3] if b1 is not None else None,
                     "convergence": [b2, b3 if b3 is not None else float(end)] if b2 is not None else None,
                     "reversal": [b3, float(end)] if b3 is not None else None}
    return out


@dataclass
class OperatingPoint:
    """The chosen strength, with fitted preference and utility there, the *measured* utility at m = 0 and at
    the point (linearly interpolated between swept m), and flags: ``within_limit`` (the measured drop is
    within the limit) and ``at_edge`` (the best point is the edge of the swept range: sweep wider)."""

    multiplier: float
    preference: float
    utility: float
    utility_at_zero: float
    measured_utility: float
    measured_drop: float
    within_limit: bool
    at_edge: bool
    side: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def operating_point(pref_fit: Fit, util_fit: Fit, multipliers, util_mean, *, max_util_drop: float = 1.0,
                    grid: int = 4001) -> OperatingPoint:
    """The m that maximises fitted preference on the side where preference rises, among the m whose fitted
    *and* measured utility (mean per m, interpolated) stay within ``max_util_drop`` of the measured mean at
    m = 0 (interpolated when 0 was not swept). Says when the point is the edge of the swept range."""
    if pref_fit.kind != "preference" or util_fit.kind != "utility":
        raise ValueError("operating_point takes a preference fit and a utility fit, in that order")
    if not max_util_drop >= 0:
        raise ValueError(f"max_util_drop must be >= 0, got {max_util_drop}")
    ms_data = np.asarray(multipliers, np.float64)
    u_data = np.asarray(util_mean, np.float64)
    order = np.argsort(ms_data)
    ms_data, u_data = ms_data[order], u_data[order]
    lo, hi = float(ms_data[0]), float(ms_data[-1])
    if not lo <= 0.0 <= hi:
        raise ValueError(f"the swept range [{lo:g}, {hi:g}] must include m = 0 to judge utility against it")
    u0 = float(np.interp(0.0, ms_data, u_data))
    rises_pos = float(pref_fit.predict(np.array([hi]))[0]) - float(pref_fit.predict(np.array([0.0]))[0])
    rises_neg = float(pref_fit.predict(np.array([lo]))[0]) - float(pref_fit.predict(np.array([0.0]))[0])
    side = "positive" if rises_pos >= rises_neg else "negative"
    ms = np.linspace(0.0, hi if side == "positive" else lo, grid)
    pref, util = pref_fit.predict(ms), util_fit.predict(ms)
    measured = np.interp(ms, ms_data, u_data)
    ok = (util >= u0 - max_util_drop) & (measured >= u0 - max_util_drop)
    ok[0] = True  # m = 0 is always admissible: no steering costs no utility
    i = int(np.argmax(np.where(ok, pref, -np.inf)))
    m_op = float(ms[i])
    drop = u0 - float(measured[i])
    at_edge = i == grid - 1
    warnings = []
    if at_edge:
        warnings.append(f"the operating point is the edge of the swept range (m = {m_op:g}): preference may keep "
                        "rising within the utility limit; sweep a wider range")
    if i == 0:
        warnings.append("no m on the rising side keeps utility within the limit: the operating point is m = 0")
    return OperatingPoint(m_op, float(pref[i]), float(util[i]), u0, float(measured[i]), drop,
                          bool(drop <= max_util_drop + 1e-9), bool(at_edge), side, warnings)

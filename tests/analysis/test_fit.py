"""The paper's curve fits: recovery of known curves, regions, operating point, clear errors."""
import math

import numpy as np
import pytest

from fastsplit.analysis import analyze, fit_curves, operating_point, plot_sweep, validity_decay
from fastsplit.analysis.fit import _model
from fastsplit.analysis.logodds import Sweep

M = np.linspace(-10, 10, 21)


def _continuous(theta, n_lin):
    theta = np.array(theta, dtype=float)
    mp, Lp, pp, mn, Ln, _ = theta[n_lin:]
    theta[-1] = pp * math.log1p(mp * mp / Lp) / math.log1p(mn * mn / Ln)  # D₊(0) = D₋(0)
    return theta


PREF = _continuous([0.8, 0.5, 1.0, 1.0, 20.0, 1.5, -1.0, 15.0, 1.2], 3)
UTIL = _continuous([6.0, -3.0, 0.5, 10.0, 1.0, -0.5, 8.0, 1.0], 2)


@pytest.mark.parametrize("kind,theta", [("preference", PREF), ("utility", UTIL)], ids=["preference", "utility"])
@pytest.mark.parametrize("noise", [0.0, 0.05], ids=["exact", "noisy"])
def test_recovers_synthetic_curves(kind, theta, noise):
    rng = np.random.default_rng(1)
    clean = _model(kind, theta, M)
    y = clean + rng.normal(0, noise, M.shape)
    fit = fit_curves(M, y, kind)
    assert fit.r2 >= 0.99
    fine = np.linspace(-10, 10, 201)
    assert np.abs(fit.predict(fine) - _model(kind, theta, fine)).max() < 0.15 + 3 * noise
    assert set(fit.params) == ({"alpha", "beta", "b"} if kind == "preference" else {"beta", "b"}) | {
        "m_pos", "L_pos", "p_pos", "m_neg", "L_neg", "p_neg"}
    p = fit.params
    d_pos = (1 + p["m_pos"] ** 2 / p["L_pos"]) ** -p["p_pos"]
    d_neg = (1 + p["m_neg"] ** 2 / p["L_neg"]) ** -p["p_neg"]
    assert abs(d_pos - d_neg) < 1e-5  # continuity at m = 0


def test_per_pair_values_and_holdout():
    rng = np.random.default_rng(2)
    clean = _model("preference", PREF, M)
    train = clean + rng.normal(0, 0.3, (12, M.size))
    test = clean + rng.normal(0, 0.3, (12, M.size))
    fit = fit_curves(M, train, "preference", holdout=(M, test.mean(0)))
    assert fit.r2 > 0.95 and fit.r2_test > 0.9 and fit.r2_test != fit.r2


def test_regions_are_ordered():
    fit = fit_curves(M, _model("preference", PREF, M), "preference")
    pos, neg = fit.regions["positive"], fit.regions["negative"]
    assert 0 < pos["linear"][1] <= pos["convergence"][0] <= 10
    assert -10 <= neg["convergence"][0] <= neg["linear"][1] < 0
    assert pos["transitional"] == [pos["linear"][1], pos["convergence"][0]]


def test_operating_point_respects_utility():
    pref = fit_curves(M, _model("preference", PREF, M), "preference")
    util = fit_curves(M, _model("utility", UTIL, M), "utility")
    op = operating_point(pref, util, max_util_drop=1.0)
    u0 = util.predict(np.array([0.0]))[0]
    assert op.utility >= u0 - 1.0 - 1e-9
    grid = np.linspace(-10, 10, 2001)
    allowed = util.predict(grid) >= u0 - 1.0
    assert op.preference >= pref.predict(grid)[allowed].max() - 1e-3
    loose = operating_point(pref, util, max_util_drop=100.0)
    assert loose.preference >= op.preference
    with pytest.raises(ValueError, match="preference fit and a utility fit"):
        operating_point(util, pref)


@pytest.mark.parametrize("m,y,msg", [
    (M[:8], np.arange(8.0), "at least 9 points"),
    (M, np.where(M > 0, np.nan, 1.0), "finite"),
    (M, np.ones_like(M), "constant"),
    (M, np.arange(20.0), "differ in length"),
])
def test_degenerate_inputs(m, y, msg):
    with pytest.raises(ValueError, match=msg):
        fit_curves(m, y, "preference")
    with pytest.raises(ValueError, match="kind must be"):
        fit_curves(M, np.arange(21.0), "slope")


def test_validity_decay_branches():
    d = validity_decay(np.array([-2.0, 0.0, 2.0]), 0.0, 4.0, 1.0, 0.0, 1.0, 2.0)
    np.testing.assert_allclose(d, [(1 + 4.0) ** -2, 1.0, (1 + 1.0) ** -1])


def test_analyze_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    # Build NLLs that produce these log-odds: pref = Ln - Lp, util from e^-Lp + e^-Ln.
    sweep = Sweep(M, np.zeros_like(pref), pref, pref, util, np.zeros_like(pref, dtype=bool))
    result = analyze(sweep)
    assert result["preference"].r2 > 0.95 and result["utility"].r2 > 0.95
    assert set(result["split_half"]) == {"preference", "utility"}
    paths = plot_sweep(sweep, result["preference"], result["utility"], result["operating_point"],
                       str(tmp_path / "plot"))
    for p in paths:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000

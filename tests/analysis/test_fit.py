"""The paper's curve fits: the stated form (each side normalised at 0), recovery of known curves (also near the
bounds), never worse than a brute-force optimum, held-out-m scores, the operating point against measured
utility, answer-group diagnostics, clear errors."""
import numpy as np
import pytest

from fastsplit.analysis import analyze, answer_groups, fit_curves, heldout_m_r2, operating_point, plot_sweep, validity_decay
from fastsplit.analysis.fit import P_BOUNDS, _from_search, _jacobian, _model, _to_search, brute_force_sse, fit_many
from fastsplit.analysis.logodds import Sweep

M = np.linspace(-10, 10, 21)
# (alpha, beta, p0, m+, L+, p+, m-, L-, p-) and (u0, beta, m+, L+, p+, m-, L-, p-)
PREF = np.array([0.8, 0.5, 1.0, 1.0, 20.0, 1.5, -1.0, 15.0, 1.2])
UTIL = np.array([-24.0, 6.0, 0.5, 10.0, 1.0, -0.5, 8.0, 1.0])
NEAR_BOUND = np.array([0.5, -0.3, 0.2, 0.0, 40.0, P_BOUNDS[1] * 0.9, 0.5, 60.0, 0.02])  # p+ near its upper bound
CASES = {"preference": ("preference", PREF), "utility": ("utility", UTIL), "near-bound": ("preference", NEAR_BOUND)}


def test_each_side_is_normalised_to_one_at_zero():
    d = validity_decay(np.array([-1e-9, 0.0, 1e-9]), 2.0, 3.0, 1.5, -4.0, 5.0, 0.7)
    np.testing.assert_allclose(d, 1.0, atol=1e-8)  # continuous at 0 with no constraint between the sides
    d = validity_decay(np.array([-2.0, 2.0]), 0.0, 4.0, 1.0, 0.0, 1.0, 2.0)
    np.testing.assert_allclose(d, [(1 + 4.0) ** -2, (1 + 1.0) ** -1])


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_jacobian_matches_finite_differences(case):
    kind, params = CASES[case]
    n_lin = 3 if kind == "preference" else 2
    z = _to_search(params, n_lin)
    m = np.concatenate([M, [0.0, 1e-3, -1e-3, 0.37]])  # m = 0 uses the positive branch
    eps = 1e-6
    numeric = np.stack([(_model(kind, _from_search(z + eps * e, n_lin), m) - _model(kind, _from_search(z - eps * e, n_lin), m))
                        / (2 * eps) for e in np.eye(len(z))], axis=1)
    np.testing.assert_allclose(_jacobian(kind, params, m), numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("noise", [0.0, 0.02], ids=["exact", "noisy"])
def test_recovers_curves_drawn_from_the_model(case, noise):
    kind, params = CASES[case]
    clean = _model(kind, params, M)
    y = clean + np.random.default_rng(1).normal(0, noise, M.shape) * np.ptp(clean)
    fit = fit_curves(M, y, kind)
    assert fit.converged or case == "near-bound"  # there the optimum sits on a bound; the fit says so itself
    assert fit.r2 >= 0.999
    fine = np.linspace(-10, 10, 201)
    assert np.abs(fit.predict(fine) - _model(kind, params, fine)).max() < 0.02 * np.ptp(clean) + 4 * noise * np.ptp(clean)
    value_at_0 = "p0" if kind == "preference" else "u0"
    assert abs(fit.params[value_at_0] - params[2 if kind == "preference" else 0]) < 0.05 * np.ptp(clean) + 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_never_below_a_brute_force_optimum(case):
    kind, params = CASES[case]
    rng = np.random.default_rng(7)
    y = _model(kind, params, M) + rng.normal(0, 0.1, M.shape)
    fit = fit_curves(M, y, kind)
    sse = float(((fit.predict(M) - y) ** 2).sum())
    assert sse <= brute_force_sse(M, y, kind) * (1 + 1e-9)


def test_utility_reports_the_well_determined_amplitudes():
    fit = fit_curves(M, _model("utility", UTIL, M), "utility")
    for side in ("pos", "neg"):
        assert fit.params[f"A_{side}"] == pytest.approx(fit.params["beta"] * fit.params[f"p_{side}"])
    assert abs(fit.params["u0"] - UTIL[0]) < 1e-3


def test_bound_hits_are_reported():
    # A step is the limit L -> 0: the fit can only approach it on the bounds, and must say so.
    y = np.where(M > 0, 1.0, 0.0) + 0.01 * M
    fit = fit_curves(M, y, "preference")
    assert fit.at_bounds


def test_heldout_m_tests_the_form_not_the_noise():
    rng = np.random.default_rng(2)
    good = _model("preference", PREF, M) + rng.normal(0, 0.05, M.shape)
    assert heldout_m_r2(M, good, "preference") > 0.99
    zigzag = np.where(np.arange(M.size) % 2 == 0, 1.0, -1.0) + 0.1 * M  # no curve of the family explains it
    assert heldout_m_r2(M, zigzag, "preference") < 0.5
    assert heldout_m_r2(M[:9], good[:9], "preference") is None  # too few points to leave one out


def _sweep(pref, util, groups=None):
    z = np.zeros_like(pref)
    return Sweep(M, z, pref, pref, util, z.astype(bool), groups=groups)


def test_operating_point_is_judged_against_measured_utility():
    pref_y, util_y = _model("preference", PREF, M), _model("utility", UTIL, M)
    pref, util = fit_curves(M, pref_y, "preference"), fit_curves(M, util_y, "utility")
    measured = util_y.copy()
    measured[M == 0] += 0.8  # measured utility at 0 above the fit: the drop must count from the measurement
    op = operating_point(pref, util, M, measured, max_util_drop=1.0)
    assert op.utility_at_zero == pytest.approx(measured[M == 0][0])
    assert op.measured_drop <= 1.0 + 1e-9 and op.within_limit and op.side == "positive"
    assert op.multiplier > 0 and not op.at_edge
    loose = operating_point(pref, util, M, measured, max_util_drop=1e6)  # the fitted peak, inside the range
    fine = np.linspace(0, 10, 4001)
    assert loose.multiplier == pytest.approx(fine[np.argmax(pref.predict(fine))]) and not loose.at_edge
    rising = fit_curves(M, 0.3 * M + 0.01 * M ** 2, "preference")  # still rising at the edge
    edge = operating_point(rising, util, M, measured, max_util_drop=1e6)
    assert edge.at_edge and edge.multiplier == pytest.approx(10.0) and "wider range" in edge.warnings[0]
    with pytest.raises(ValueError, match="preference fit and a utility fit"):
        operating_point(util, pref, M, measured)
    with pytest.raises(ValueError, match="include m = 0"):
        operating_point(pref, util, M[M > 0], measured[M > 0])


def test_operating_point_searches_the_side_where_preference_rises():
    flipped = PREF.copy()
    flipped[0] = -flipped[0]  # preference rises for m < 0
    pref = fit_curves(M, _model("preference", flipped, M), "preference")
    util_y = _model("utility", UTIL, M)
    op = operating_point(pref, fit_curves(M, util_y, "utility"), M, util_y, max_util_drop=1.0)
    assert op.side == "negative" and op.multiplier < 0


def test_answer_groups_warn_when_groups_move_apart():
    base = np.tile(0.2 * M, (6, 1))
    pref = base.copy()
    pref[:3] = -0.3 * M  # the " No" pairs move the other way
    groups = [" No"] * 3 + [" Yes"] * 3
    g = answer_groups(_sweep(pref, np.tile(_model("utility", UTIL, M), (6, 1)), groups), 5.0)
    assert g["opposite"] and g["by_group"][" No"]["change_at_probe"] < 0 < g["by_group"][" Yes"]["change_at_probe"]
    assert g["share_rising"][-1] == pytest.approx(0.5)
    same = answer_groups(_sweep(base, base, groups), 5.0)
    assert not same["opposite"] and same["share_rising"][-1] == pytest.approx(1.0)


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
    for tol in (0.0, 1.5, "1e-6"):
        with pytest.raises(ValueError, match="tol must be"):
            fit_curves(M, np.arange(21.0), "preference", tol=tol)


def test_refit_tolerance_keeps_the_fit():
    """A refit from the full fit at REFIT_TOL lands on the same curve as one at 1e-9 (to 1e-5 of the values' span),
    and the bootstrap and held-out m read their figures to a few digits."""
    from fastsplit.analysis.fit import REFIT_TOL

    rng = np.random.default_rng(5)
    y = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    full = fit_curves(M, y, "preference")
    resample = y[rng.integers(0, 8, 8)]
    tight = fit_curves(M, resample, "preference", starts=0, init=full)
    loose = fit_curves(M, resample, "preference", starts=0, init=full, tol=REFIT_TOL)
    span = float(np.ptp(resample.mean(0)))
    assert np.abs(tight.predict(M) - loose.predict(M)).max() < 1e-5 * span
    assert loose.r2 == pytest.approx(tight.r2, abs=1e-6)


def test_fit_many_is_fit_curves_per_job():
    """Several fits with their starts in one pool: each is the fit fit_curves makes alone, parameter for parameter."""
    rng = np.random.default_rng(6)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    both = fit_many([(M, pref, "preference"), (M, util, "utility")])
    alone = [fit_curves(M, pref, "preference"), fit_curves(M, util, "utility")]
    for got, want in zip(both, alone):
        assert got.kind == want.kind and np.array_equal(got._params, want._params) and got.r2 == want.r2
    refits = fit_many([(M, pref[::-1], "preference"), (M, util[::-1], "utility")], starts=0, init=both)
    assert np.array_equal(refits[0]._params, fit_curves(M, pref[::-1], "preference", starts=0, init=both[0])._params)
    with pytest.raises(ValueError, match="init has 1 entries for 2 jobs"):
        fit_many([(M, pref, "preference"), (M, util, "utility")], init=[both[0]])
    with pytest.raises(ValueError, match="kind must be"):
        fit_many([(M, pref, "preference"), (M, util, "slope")])


def test_on_fits_sees_the_fits_before_the_bootstrap():
    """analyze's on_fits gets the finished fits (for the plot) before the bootstrap, once, and changes nothing."""
    rng = np.random.default_rng(8)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    seen = []
    result = analyze(_sweep(pref, util), bootstrap_samples=10,
                     on_fits=lambda r: seen.append((r["bootstrap"], r["preference"], r["identifiability"])))
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1] is result["preference"]
    assert seen[0][2] is result["identifiability"] and result["bootstrap"]["resamples"] == 10
    plain = analyze(_sweep(pref, util), bootstrap_samples=10)
    assert plain["bootstrap"] == result["bootstrap"] and plain["warnings"] == result["warnings"]
    seen.clear()
    analyze(_sweep(pref, util), bootstrap_samples=0, on_fits=lambda r: seen.append(r["bootstrap"]))
    assert seen == [None]  # no bootstrap: still called


def test_analyze_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    groups = [" Yes", " No"] * 4
    result = analyze(_sweep(pref, util, groups), bootstrap_samples=20)
    assert result["preference"].r2 > 0.95 and result["utility"].r2 > 0.95
    assert result["heldout_m"]["preference"] > 0.9 and result["heldout_m"]["utility"] > 0.9
    b = result["bootstrap"]
    assert b["resamples"] == 20 and b["m_op"][0] <= result["operating_point"].multiplier <= b["m_op"][1] + 1e-9
    assert set(result["groups"]["by_group"]) == {" Yes", " No"} and not result["groups"]["opposite"]
    paths = plot_sweep(_sweep(pref, util), result["preference"], result["utility"], result["operating_point"],
                       str(tmp_path / "plot"), title="tiny, vector at layer 2, 8 pairs")
    for p in paths:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000


def test_plot_artists(tmp_path, monkeypatch):
    """What a reviewer checks, read back from the figure: units and titles, the utility limit that defines the
    operating point (at the measured utility at 0 minus the drop), held-out R² in the legend, regions as a strip
    apart from the data's band, and the parameters the fits leave undetermined."""
    import matplotlib
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(5)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    sweep = _sweep(pref, util)
    result = analyze(sweep, bootstrap_samples=0)
    result["identifiability"]["utility"]["not_identified"] = {"beta": "standard error 1e5 against 3"}  # as shown
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_sweep(sweep, result["preference"], result["utility"], result["operating_point"], str(tmp_path / "p"),
               heldout_r2=result["heldout_m"], max_util_drop=0.7, identifiability=result["identifiability"])
    (fig,) = figs
    ax_p, ax_u = fig.axes[:2]
    assert "(nats)" in ax_p.get_ylabel() and "(nats)" in ax_u.get_ylabel()
    assert (ax_p.get_title(), ax_u.get_title()) == ("Preference", "Utility")
    op = result["operating_point"]
    limit = [line for line in ax_u.get_lines() if "utility limit" in line.get_label()]
    assert len(limit) == 1 and np.allclose(limit[0].get_ydata(), op.utility_at_zero - 0.7)
    legend = " ".join(t.get_text() for ax in (ax_p, ax_u) for t in ax.get_legend().get_texts())
    assert f"held-out-m $R^2$ = {result['heldout_m']['preference']:.3f}" in legend
    assert f"held-out-m $R^2$ = {result['heldout_m']['utility']:.3f}" in legend
    strips = [p for p in ax_p.patches if (p.get_label() or "").startswith("region: ")]
    assert strips and all(isinstance(p, matplotlib.patches.Rectangle) or p.get_extents() for p in strips)
    for patch in ax_p.patches:  # every region drawn as a strip at the bottom, not over the data
        if isinstance(patch, matplotlib.patches.Polygon):
            assert max(y for _, y in patch.get_xy()) <= 0.06 + 1e-9
    notes = " ".join(t.get_text() for t in ax_u.texts)
    assert "not identified: beta" in notes and "kink at m = 0" in notes
    # The legend sits below the axes, clear of the data.
    assert ax_p.get_legend().get_bbox_to_anchor().y0 < ax_p.get_window_extent().y0


def test_identifiability_and_the_simpler_member():
    """Data drawn from a straight line: the full decay has nothing to decay to, so its decay parameters are not
    identified, and the 'no decay' member (a line) fits as well and is reported."""
    from fastsplit.analysis.fit import simpler_member

    rng = np.random.default_rng(1)
    y = 0.8 * M + 0.3 + rng.normal(0, 0.05, M.size)
    fit = fit_curves(M, y, "preference")
    assert not fit.identified and fit.not_identified
    simple = simpler_member(fit, M, y)
    assert simple is not None and simple.member == "no decay" and simple.r2 > 0.99
    assert simple.identified and abs(simple.params["alpha"] - 0.8) < 0.05
    curve = _model("preference", PREF, M) + rng.normal(0, 0.05, M.size)  # every feature of the family present
    full = fit_curves(M, curve, "preference")
    assert full.identified and not full.not_identified and simpler_member(full, M, curve) is None


def test_value_at_zero_is_compared_with_the_measurement():
    rng = np.random.default_rng(2)
    pref = _model("preference", PREF, M) + rng.normal(0, 0.2, (8, M.size))
    util = _model("utility", UTIL, M) + rng.normal(0, 0.2, (8, M.size))
    result = analyze(_sweep(pref, util), bootstrap_samples=0)
    for kind, values in (("preference", pref), ("utility", util)):
        z = result["identifiability"][kind]["at_zero"]
        assert np.isclose(z["measured"], np.interp(0.0, M, values.mean(0)))
        assert np.isclose(z["gap"], z["fitted"] - z["measured"]) and abs(z["gap"]) < 0.5

"""fastsplit compare on synthetic sweeps whose frontiers are known: a dominating and a dominated intervention, a
crossing pair, a drop never reached; refusals; the CLI."""
import json
import os

import numpy as np
import pytest

from fastsplit.analysis import compare
from fastsplit.analysis.compare import format_table, frontier, gain_at_drop, read_sweep_dir
from fastsplit.analysis.logodds import Sweep
from fastsplit.cli import main

MS = np.linspace(-5, 5, 21)  # steps of 0.5
N = 24


def _nll(P, U):
    """Summed NLLs whose preference and utility log-odds are P and U (the utility's inverse)."""
    a = 1 / (1 + np.exp(-U))  # e^-Lp + e^-Ln
    Lp = -np.log(a / (1 + np.exp(-P)))
    return Lp, Lp + P


def _write(folder, drop, gain, *, pairs_sha="abc", model="tiny", form="vector", objective="split", m_op=2.0, seed=0):
    """A sweep folder whose mean frontier on each side is exactly (drop(|m|), ±gain(|m|)): every pair's curve is the
    mean scaled by 1 ± 0.1 (balanced, so the mean is exact) plus its own offset."""
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(N) % 2 == 0, 1.1, 0.9)[:, None]
    p0, u0 = rng.normal(0, 1, (N, 1)), rng.normal(-3, 0.5, (N, 1))
    G = np.sign(MS) * gain(np.abs(MS))
    P = p0 + scale * G[None]
    U = u0 - scale * drop(np.abs(MS))[None]
    lp, ln = _nll(P, U)
    os.makedirs(folder, exist_ok=True)
    Sweep.from_nll(MS, lp, ln).to_csv(os.path.join(folder, "sweep.csv"))
    fit = {"operating_point": {"multiplier": m_op}, "scores": {"preference_r2_heldout_m": 0.9,
                                                                "utility_r2_heldout_m": 0.8},
           "bootstrap": {"m_op": [m_op - 0.5, m_op + 0.5]},
           "provenance": {"model": model, "pairs_sha256": pairs_sha, "pairs": N, "pairs_source": "synthetic",
                          "steering": {"form": form, "layer": 3, "objective": objective}}}
    with open(os.path.join(folder, "fit.json"), "w") as f:
        json.dump(fit, f)
    return str(folder)


LIN_A = dict(drop=lambda m: m / 2, gain=lambda m: 2 * m)  # G = 4·D
LIN_B = dict(drop=lambda m: m, gain=lambda m: 1.0 * m)  # G = D: dominated by A
CROSS = dict(drop=lambda m: m / 2, gain=lambda m: np.where(m <= 1, 4 * m, 4 + (m / 2 - 0.5)))  # 8·D, then flat
SHORT = dict(drop=lambda m: 0.375 * m, gain=lambda m: m)  # the drop reaches only 1.875


def test_gain_at_drop_interpolates_on_the_measured_frontier():
    P, U = 2 * MS, -np.abs(MS) / 2
    assert gain_at_drop(MS, P, U, 1.0, "positive") == pytest.approx(4.0)
    assert gain_at_drop(MS, P, U, 0.75, "positive") == pytest.approx(3.0)  # between m = 1.5 and 2
    assert gain_at_drop(MS, P, U, 1.0, "negative") == pytest.approx(-4.0)
    assert gain_at_drop(MS, P, U, 3.0, "positive") is None  # the drop ends at 2.5: never extrapolated
    m, d, g = frontier(MS[MS != 0], P[MS != 0], U[MS != 0], "positive")  # m = 0 interpolated in: U(0) = -0.25
    assert m[0] == 0 and d[0] == 0 and g[0] == 0 and d[-1] == pytest.approx(2.25) and g[-1] == pytest.approx(10.0)


def test_dominating_dominated_and_crossing(tmp_path):
    a = _write(tmp_path / "a", **LIN_A, form="vector", seed=1)
    b = _write(tmp_path / "b", **LIN_B, form="lora", seed=2)
    c = _write(tmp_path / "c", **CROSS, form="local_weight", seed=3)
    res = compare([a, b, c], str(tmp_path / "out"), bootstrap=200, progress=False)
    rows = {r["form"]: r["figures"] for r in res["interventions"]}
    for d, want in ((0.5, 2.0), (1.0, 4.0), (2.0, 8.0)):
        assert rows["vector"][f"gain@{d:g}:positive"]["value"] == pytest.approx(want)
        assert rows["lora"][f"gain@{d:g}:positive"]["value"] == pytest.approx(d)
    assert rows["local_weight"]["gain@0.5:positive"]["value"] == pytest.approx(4.0)
    assert rows["local_weight"]["gain@2:positive"]["value"] == pytest.approx(5.5)
    ab = res["pairwise"]["vector L3 split − lora L3 split"]["positive"]
    for d in ("0.5", "1", "2"):  # A dominates B: every interval above 0
        assert ab[d]["lo"] > 0 and ab[d]["reached"] == 1.0
    ac = res["pairwise"]["vector L3 split − local_weight L3 split"]["positive"]
    assert ac["0.5"]["hi"] < 0 < ac["2"]["lo"]  # C ahead at a small drop, A ahead at a large one
    table = format_table(res)
    assert "drop 0.5: -2.000" in table and "local_weight L3 split ahead" in table and "vector L3 split ahead" in table
    for name in ("compare.json", "compare.csv", "compare.png", "compare.svg"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
    # the accuracy at m = 0: half the pairs have p0 > 0 in expectation; a figure in [0, 1] with an interval
    acc = rows["vector"]["accuracy_m0"]
    assert 0 <= acc["lo"] <= acc["value"] <= acc["hi"] <= 1


def test_a_drop_never_reached_is_reported_as_such(tmp_path):
    a = _write(tmp_path / "a", **LIN_A)
    s = _write(tmp_path / "s", **SHORT, form="lora")
    res = compare([a, s], bootstrap=50, progress=False)
    short = next(r for r in res["interventions"] if r["form"] == "lora")["figures"]
    assert short["gain@1:positive"]["value"] == pytest.approx(1 / 0.375)
    assert short["gain@2:positive"]["value"] is None and short["gain@2:positive"]["reached"] == 0.0
    diff = res["pairwise"]["vector L3 split − lora L3 split"]["positive"]["2"]
    assert diff["diff"] is None and diff["reached"] == 0.0
    assert "not reached" in format_table(res)


RISING = dict(drop=lambda m: -0.2 * m, gain=lambda m: m)  # utility rises with |m| (common on base models)


def test_utility_that_rises_is_said_in_words(tmp_path):
    """Where utility rises with m there is no drop to match: the table says so, not a bare "not reached"."""
    a = _write(tmp_path / "a", **LIN_A)
    r = _write(tmp_path / "r", **RISING, form="lora")
    res = compare([a, r], bootstrap=20, progress=False)
    rising = next(x for x in res["interventions"] if x["form"] == "lora")["figures"]
    assert rising["largest_drop:positive"]["value"] == 0.0 and rising["gain@1:positive"]["value"] is None
    table = format_table(res)
    row = next(line for line in table.splitlines() if line.startswith("lora L3 split"))
    assert "utility rises for m > 0: no drop to match" in row
    assert "utility rises for m > 0 in lora L3 split: no drop to match" in table
    short = compare([a, _write(tmp_path / "s", **SHORT, form="lora")], bootstrap=20, progress=False)
    assert "not reached (largest drop 1.88)" in format_table(short)


def test_mismatched_pairs_or_models_are_refused(tmp_path):
    a = _write(tmp_path / "a", **LIN_A)
    with pytest.raises(ValueError, match="other pairs"):
        compare([a, _write(tmp_path / "b", **LIN_B, pairs_sha="xyz")], progress=False)
    with pytest.raises(ValueError, match="other model"):
        compare([a, _write(tmp_path / "c", **LIN_B, model="other")], progress=False)
    old = _write(tmp_path / "old", **LIN_B)
    fit = json.load(open(os.path.join(old, "fit.json")))
    del fit["provenance"]
    json.dump(fit, open(os.path.join(old, "fit.json"), "w"))
    with pytest.raises(ValueError, match="records no provenance"):
        read_sweep_dir(old)
    with pytest.raises(ValueError, match="at least two"):
        compare([a], progress=False)


def test_cli_compare(tmp_path, capsys):
    a, b = _write(tmp_path / "a", **LIN_A), _write(tmp_path / "b", **LIN_B, form="lora")
    assert main(["compare", a, b, "--out", str(tmp_path / "o"), "--bootstrap", "50", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "vector L3 split" in out and "gain @ drop 1" in out
    c = _write(tmp_path / "c", **LIN_B, pairs_sha="other")
    assert main(["compare", a, c, "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other pairs" in err
    assert not os.path.exists(tmp_path / "o2" / "compare.json")


def test_the_report_says_when_utility_rose_at_the_operating_point(tmp_path, capsys):
    """A sweep whose utility rises with |m| (common on base models): the printed operating point says the utility
    rose, never "a drop of -0.4"."""
    from fastsplit.analysis import analyze
    from fastsplit.cli.analysis import print_report, write_report

    folder = _write(tmp_path / "r", **RISING)
    sweep = Sweep.from_csv(os.path.join(folder, "sweep.csv"))
    result = analyze(sweep, bootstrap_samples=0, progress=False)
    report = write_report(sweep, result, str(tmp_path / "out"), "rising", 1.0)
    op = report["operating_point"]
    assert op["measured_drop"] < 0
    print_report(report)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("operating point:"))
    assert f"utility rose by {-op['measured_drop']:.3f}: no drop there" in line and "a drop of" not in line

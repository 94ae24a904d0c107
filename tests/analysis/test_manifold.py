"""The manifold measures (sweep --manifold): zero at m = 0 and growing with |m| on a random model, the same in one
batch or per pair, the monotone fit, the explanation of the utility drop against |m|, and the CLI."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import fastsplit
from fastsplit.analysis.logodds import Sweep
from fastsplit.analysis.manifold import COLUMNS, _isotonic, explain_utility, isotonic_r2, manifold_sweep
from fastsplit.cli import main
from tests.tiny import randomize, tiny_model, tiny_tokenizer

MS = [-3.0, -1.5, 0.0, 1.5, 3.0]
PAIRS = fastsplit.demo_pairs()[:5]


@pytest.mark.parametrize("form", ["vector", "lora"])
def test_zero_at_m0_growing_with_abs_m_and_independent_of_batching(form):
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, form, rank=2)
    randomize(s, scale=0.3)
    tok = tiny_tokenizer()
    one = manifold_sweep(model, tok, s, PAIRS, MS, progress=False)
    each = manifold_sweep(model, tok, s, PAIRS, MS, progress=False, batch_size=1)
    for c in COLUMNS:
        assert one[c].shape == (len(PAIRS), len(MS))
        np.testing.assert_allclose(one[c], each[c], rtol=1e-4, atol=1e-6 * max(1.0, np.abs(one[c]).max()))
    for site in ("steered", "last"):
        off = one[f"off_{site}"]
        assert np.all(off[:, 2] == 0) and np.all(one[f"shift_{site}"][:, 2] == 0)  # m = 0: no displacement
        assert np.all(off[:, 3] > 0) and np.all(off[:, 4] > off[:, 3]) and np.all(off[:, 0] > off[:, 1])
        assert 0 < one["subspace"][site]["dims"] <= one["subspace"][site]["hidden"]
    # the vector at layer 1 is affine in m at its own layer: the shift there is exactly linear in m
    if form == "vector":
        sh = one["shift_steered"]
        np.testing.assert_allclose(sh[:, 4], 2 * sh[:, 3], rtol=1e-4, atol=1e-6)


def test_isotonic_fit_matches_scipy_and_pools_ties():
    from scipy.optimize import isotonic_regression

    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = np.tanh(x) + rng.normal(scale=0.3, size=60)
    order = np.argsort(x)
    want = np.empty(60)
    want[order] = isotonic_regression(y[order]).x
    np.testing.assert_allclose(_isotonic(x, y), want, atol=1e-12)
    xt = np.repeat([0.0, 1.0, 2.0], 4)  # ties share one fitted value
    fit = _isotonic(xt, rng.normal(size=12))
    assert len(set(np.round(fit[:4], 12))) == 1 and np.all(np.diff(fit) >= -1e-12)
    assert isotonic_r2(x, 2 * x) == pytest.approx(1.0)


def _synthetic(drop_of_off: bool, sign: float = 1.0):
    """A sweep whose utility drop is a monotone function of the off-manifold distance (which varies across pairs
    at one m), or of |m| (with an off-manifold distance that is noise)."""
    rng = np.random.default_rng(1)
    ms = np.linspace(-4, 4, 9)
    N = 40
    k = rng.uniform(0.3, 3.0, (N, 1))
    off = k * np.abs(ms)[None]
    drop = np.sqrt(off) if drop_of_off else 0.5 * np.abs(ms)[None] + 0 * off
    if not drop_of_off:
        off = rng.uniform(0, 5, (N, ms.size)) * (ms != 0)
    P = rng.normal(size=(N, 1)) + ms[None]
    U = -2.0 - sign * drop
    a = 1 / (1 + np.exp(-U))
    lp = -np.log(a / (1 + np.exp(-P)))
    sweep = Sweep.from_nll(ms, lp, lp + P)
    sweep.extra = {"off_steered": off, "off_last": off, "shift_steered": off * 0, "shift_last": off * 0}
    return sweep


def test_explain_utility_says_which_predictor_wins():
    good = explain_utility(_synthetic(True), bootstrap=100)
    assert good["last"]["off_manifold"]["r2_monotone"] == pytest.approx(1.0, abs=1e-9)
    assert good["last"]["difference"]["r2"][0] > 0 and "better than |m|" in good["last"]["verdict"]
    bad = explain_utility(_synthetic(False), bootstrap=100)
    assert bad["last"]["abs_m"]["r2_monotone"] == pytest.approx(1.0, abs=1e-9)
    assert bad["last"]["difference"]["r2"][1] < 0 and bad["last"]["verdict"].startswith("|m| predicts")
    with pytest.raises(ValueError, match="sweep with --manifold"):
        explain_utility(Sweep.from_nll([0, 1], np.ones((2, 2)), np.ones((2, 2))))


def test_explain_utility_reads_the_sign():
    """Utility that rises as representations leave the manifold (a base model's case): the verdict says so, rather
    than "neither explains the drop" beside a strongly negative ρ."""
    rising = explain_utility(_synthetic(True, sign=-1.0), bootstrap=100)["last"]
    assert rising["off_manifold"]["spearman"] < -0.9
    assert rising["verdict"].startswith("utility rises, not falls, as the off-manifold distance grows")
    assert "no drop to explain" in rising["verdict"]


def test_cli_sweep_manifold(tmp_path, capsys):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    run = str(tmp_path / "run")
    assert main(["train", "--model", str(d), "--layer", "1", "--epochs", "1", "--test-size", "0.9", "--out", run,
                 "--quiet"]) == 0
    out = str(tmp_path / "sw")
    assert main(["sweep", "--model", str(d), "--steering", os.path.join(run, "steering.safetensors"), "--max-pairs",
                 "6", "--multipliers=-5,-4,-3,-2,-1,0,1,2,3,4,5", "--bootstrap", "5", "--manifold", "--out", out,
                 "--quiet"]) == 0
    assert "manifold (last layer)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    assert set(COLUMNS) <= set(rows[0]) and len(rows) == 6 * 11
    assert all(float(r["off_last"]) == 0 for r in rows if float(r["multiplier"]) == 0)
    fit = json.load(open(os.path.join(out, "fit.json")))
    for site in ("steered", "last"):
        assert {"off_manifold", "abs_m", "difference", "verdict"} <= set(fit["manifold"][site])
    assert fit["manifold"]["subspace"]["last"]["dims"] >= 1
    assert fit["provenance"]["steering"]["objective"] == "split" and fit["provenance"]["pairs"] == 6
    back = Sweep.from_csv(os.path.join(out, "sweep.csv"))
    assert set(back.extra) == set(COLUMNS)

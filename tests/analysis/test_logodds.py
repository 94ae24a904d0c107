"""The fast log-odds sweep equals the naive loop; UtilOdds is stable at extreme values."""
import numpy as np
import pytest

import fastsplit
from fastsplit.analysis import Sweep, logodds_naive, logodds_sweep, util_odds
from tests.tiny import ARCHS, randomize, tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:4] + [fastsplit.Pair("Hi there", "Sure, I can help with that today", "No")]
MS = [-3.0, -0.5, 0.0, 2.0]


@pytest.mark.parametrize("layer", [0, 2], ids=["layer0", "layer2"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sweep_equals_naive_loop(arch, form, layer):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = fastsplit.attach(model, layer, form, rank=2)
    randomize(s)
    fast = logodds_sweep(model, tok, s, PAIRS, MS, batch_size=2, progress=False)
    slow = logodds_naive(model, tok, s, PAIRS, MS, progress=False)
    assert fast.nll_pos.shape == (len(PAIRS), len(MS))
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, atol=1e-3, rtol=1e-4)
    assert np.ptp(fast.pref_odds, axis=1).max() > 1e-3  # m really changes the NLLs


def test_residual_site_and_length_norm():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector", site="residual")
    randomize(s)
    fast = logodds_sweep(model, tok, s, PAIRS, MS, length_norm=True, progress=False)
    slow = logodds_naive(model, tok, s, PAIRS, MS, length_norm=True, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, atol=1e-3, rtol=1e-4)
    assert fast.length_norm


def test_util_odds_is_stable():
    lp = np.array([1e-9, 1.0, 50.0, 800.0, 0.0, 3.0])
    ln = np.array([1e-9, 1.5, 60.0, 900.0, 0.0, 3.0])
    u, clamped = util_odds(lp, ln)
    assert np.isfinite(u).all()
    # moderate values agree with the textbook formula
    direct = np.log((np.exp(-lp[1]) + np.exp(-ln[1])) / (1 - np.exp(-lp[1]) - np.exp(-ln[1])))
    np.testing.assert_allclose(u[1], direct, rtol=1e-12)
    # deep underflow: log(e^-50 + e^-60) - log(1 - tiny) without NaN or -inf
    np.testing.assert_allclose(u[2], np.logaddexp(-50.0, -60.0), rtol=1e-12)
    np.testing.assert_allclose(u[3], -800.0 + np.log1p(np.exp(-100.0)), rtol=1e-12)
    assert list(clamped) == [True, False, False, False, True, False]  # mass >= 1: clamped and flagged


def test_summary_and_csv(tmp_path):
    sweep = Sweep.from_nll([-1.0, 0.0, 1.0], [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], [[3.0, 2.0, 1.0], [2.5, 2.0, 1.5]])
    s = sweep.summary()
    np.testing.assert_allclose(s["pref_mean"], [1.25, 0.0, -1.25])
    np.testing.assert_allclose(s["pref_se"], np.std([[2.0, 0.0, -2.0], [0.5, 0.0, -0.5]], axis=0, ddof=1) / np.sqrt(2))
    path = tmp_path / "s.csv"
    sweep.to_csv(str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == "pair,multiplier,nll_pos,nll_neg,pref_odds,util_odds,util_clamped" and len(lines) == 7


def test_bad_inputs():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    with pytest.raises(ValueError, match="pairs is empty"):
        logodds_sweep(model, tok, s, [], MS)
    with pytest.raises(ValueError, match="multipliers"):
        logodds_sweep(model, tok, s, PAIRS, [float("nan")])

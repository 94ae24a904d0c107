"""The fast log-odds sweep equals the naive loop; UtilOdds is stable at extreme values."""
import contextlib

import numpy as np
import pytest
import torch

import fastsplit
from fastsplit import hf
from fastsplit.analysis import Sweep, logodds_naive, logodds_sweep, util_odds
from tests.tiny import ARCHS, randomize, tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:4] + [fastsplit.Pair("Hi there", "Sure, I can help with that today", "No")]
MS = [-3.0, -0.5, 0.0, 2.0]
SHARP = 0.15  # weight std of the tiny models: attention far from uniform, so a wrong KV cache shows
NLL_TOL = dict(atol=2e-4, rtol=0)  # summed fp32 NLLs of ~70 agree to ~2e-5 (measured); the issue allows 1e-3


@pytest.mark.parametrize("layer", [0, 2, 3], ids=["layer0", "layer2", "last_layer"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sweep_equals_naive_loop(arch, form, layer):
    model, tok = tiny_model(arch, init_std=SHARP), tiny_tokenizer()
    s = fastsplit.attach(model, layer, form, rank=2)
    randomize(s)
    fast = logodds_sweep(model, tok, s, PAIRS, MS, batch_size=2, progress=False)
    slow = logodds_naive(model, tok, s, PAIRS, MS, progress=False)
    assert fast.nll_pos.shape == (len(PAIRS), len(MS))
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, **NLL_TOL)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, **NLL_TOL)
    assert np.ptp(fast.pref_odds, axis=1).max() > 1e-3  # m really changes the NLLs


PREAMBLE = "Read the statement below and answer with the letter of one choice. "
MC_PAIRS = [fastsplit.Pair(PREAMBLE + q, pos, neg) for q, pos, neg in [
    ("I like rain.\n(A) Yes (B) No", " (A)", " (B)"),
    ("x", " (B)", " (A)"),  # the shortest prompt: the shared prefix and one more token
    ("People who cross me regret it, sooner or later, every one of them.\n(A) Yes (B) No", " (B)", " (A)"),
    ("I plan ahead.\n(A) No (B) Yes", " (B) Yes", " (A)"),
    ("I rarely think about others.\n(A) Yes (B) No", " (A)", " (B) No"),
]]


@pytest.mark.parametrize("layer", [0, 2, 3], ids=["layer0", "layer2", "last_layer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_equals_naive_loop(arch, layer):
    """Prompts sharing a long instruction: the prefix runs once per m for the whole sweep, then each chunk's
    rests (of different lengths, padded after the prefix) and completions (of 1 to 3 tokens)."""
    from fastsplit.engines.transformers import _shared_prefix
    from fastsplit.data import encode_pair

    # Gemma-2's sliding window must cover a row for the shared-prefix layout (else the sweep falls back).
    model = tiny_model(arch, init_std=SHARP, config={"sliding_window": 512} if arch == "gemma2" else None)
    tok = tiny_tokenizer()
    enc = [encode_pair(tok, p) for p in MC_PAIRS]
    assert _shared_prefix([p for p, _, _ in enc]) >= len(tok(PREAMBLE)["input_ids"])  # the path under test runs
    s = fastsplit.attach(model, layer, "vector")
    randomize(s)
    for pairs, batch in ((MC_PAIRS, 2), (MC_PAIRS, None), ([MC_PAIRS[0]] * 2 + [MC_PAIRS[3]], 3)):
        fast = logodds_sweep(model, tok, s, pairs, MS, batch_size=batch, progress=False)
        slow = logodds_naive(model, tok, s, pairs, MS, progress=False)
        np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, **NLL_TOL)
        np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, **NLL_TOL)


def test_identical_prompts_skip_the_body_pass():
    """Every prompt the same: all but its last token is the shared prefix, and no pair has a body left."""
    model, tok = tiny_model("llama", init_std=SHARP), tiny_tokenizer()
    pairs = [fastsplit.Pair("Same question?", " Yes", " No"), fastsplit.Pair("Same question?", " No", " Yes sir")]
    s = fastsplit.attach(model, 1, "vector")
    randomize(s)
    fast = logodds_sweep(model, tok, s, pairs, MS, progress=False)
    slow = logodds_naive(model, tok, s, pairs, MS, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, **NLL_TOL)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, **NLL_TOL)


@pytest.mark.parametrize("layer", [0, 2], ids=["layer0", "layer2"])
def test_one_token_prompt(layer):
    # No chat template: the prompt is one token, so the sweep has no prompt body to cache.
    model, tok = tiny_model("llama", init_std=SHARP), tiny_tokenizer()
    pairs = [fastsplit.Pair("a", "b c", "d"), fastsplit.Pair("e", "f", "g h i")]
    assert all(len(tok(p.prompt, add_special_tokens=False)["input_ids"]) == 1 for p in pairs)
    s = fastsplit.attach(model, layer, "vector")
    randomize(s)
    fast = logodds_sweep(model, tok, s, pairs, MS, chat=False, progress=False)
    slow = logodds_naive(model, tok, s, pairs, MS, chat=False, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, **NLL_TOL)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, **NLL_TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_values_only_writes_the_same_cache(arch):
    from transformers import DynamicCache

    model = tiny_model(arch)
    last = model.config.num_hidden_layers - 1
    original = hf.decoder_layers(model)[last]
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    caches = []
    for skip in (False, True):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if skip:
                assert stack.enter_context(hf.keys_values_only(model, last))  # really swapped
            hf.decoder(model)(input_ids=ids, **hf.compat.cache_kwargs(hf.decoder(model), cache))
        caches.append(cache.layers[last])
    assert hf.decoder_layers(model)[last] is original  # restored
    torch.testing.assert_close(caches[1].keys, caches[0].keys)
    torch.testing.assert_close(caches[1].values, caches[0].values)

    # Called without a cache, the stand-in runs the full layer (after a warning): nothing is lost.
    with torch.no_grad():
        plain = hf.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        with hf.keys_values_only(model, last), pytest.warns(RuntimeWarning, match="KV cache"):
            hf.compat._warned.clear()
            fell_back = hf.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(fell_back, plain)


def test_residual_site_and_length_norm():
    model, tok = tiny_model("qwen2", init_std=SHARP), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector", site="residual")
    randomize(s)
    fast = logodds_sweep(model, tok, s, PAIRS, MS, length_norm=True, progress=False)
    slow = logodds_naive(model, tok, s, PAIRS, MS, length_norm=True, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, **NLL_TOL)
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
    assert lines[0] == "pair,group,multiplier,nll_pos,nll_neg,pref_odds,util_odds,util_clamped" and len(lines) == 7
    grouped = Sweep.from_nll([0.0], [[1.0], [2.0]], [[1.0], [1.0]], groups=["Yes", "No"])
    grouped.to_csv(str(path))
    assert path.read_text().splitlines()[1].startswith("0,Yes,0.0,")
    with pytest.raises(ValueError, match="groups has 1 labels for 2 pairs"):
        Sweep.from_nll([0.0], [[1.0], [2.0]], [[1.0], [1.0]], groups=["Yes"])


def test_csv_round_trip_is_exact(tmp_path):
    """sweep.csv holds the sweep exactly (a re-analysis gives its fit.json's figures): float32 NLLs as a sweep
    stores them, float64 ones and multipliers with no short decimal form."""
    rng = np.random.default_rng(3)
    ms = [-10 / 3, -0.1, 0.0, 1 / 7, 2.5]
    lp = rng.uniform(0.01, 60, (5, 5)).astype(np.float32).astype(np.float64)
    ln = rng.uniform(0.01, 60, (5, 5))
    sweep = Sweep.from_nll(ms, lp, ln, groups=list("abcde"))
    sweep.to_csv(str(tmp_path / "s.csv"))
    back = Sweep.from_csv(str(tmp_path / "s.csv"))
    for name in ("multipliers", "nll_pos", "nll_neg", "pref_odds", "util_odds"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sweep, name), err_msg=name)
    assert back.groups == sweep.groups


def test_bad_inputs():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    with pytest.raises(ValueError, match="pairs is empty"):
        logodds_sweep(model, tok, s, [], MS)
    with pytest.raises(ValueError, match="multipliers"):
        logodds_sweep(model, tok, s, PAIRS, [float("nan")])

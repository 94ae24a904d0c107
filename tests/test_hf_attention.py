"""hf.gqa_attention (fastsplit/hf/attention.py): SDPA's own grouped-query attention on the CPU for the span of a
sweep, the same numbers as transformers' sdpa, and the model's attention as it was afterwards.

The sweep itself runs inside it: tests/analysis/test_logodds.py compares it with the naive loop, which does not."""
import pytest
import torch

from fastsplit import hf
from fastsplit.hf import attention, compat
from tests.tiny import ARCHS, MORE_ARCHS, tiny_model, tiny_tokenizer

ALL = ARCHS + MORE_ARCHS


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tiny_tokenizer()), (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: every layer gets a mask, where transformers' sdpa copies keys and values
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ALL)
def test_same_logits_and_the_attention_restored(arch):
    model = tiny_model(arch, init_std=0.15)  # attention far from uniform, so a wrong head mapping shows
    ids, mask = _batch()
    before = model.config._attn_implementation
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with hf.gqa_attention(model) as switched:
            assert model.config._attn_implementation == (attention.NAME if switched else before)
            got = model(input_ids=ids, attention_mask=mask).logits
    assert switched == attention.applies(model)
    assert model.config._attn_implementation == before
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-6, rtol=1e-6)


def test_the_heads_are_read_in_place_only_inside(monkeypatch):
    model = tiny_model("llama")  # 4 query heads on 2 key/value heads
    assert attention.applies(model)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[1], k.shape[1], attn_mask is not None, kw.get("enable_gqa", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, mask = _batch()
    with torch.no_grad():
        with hf.gqa_attention(model):
            model(input_ids=ids, attention_mask=mask)
        assert seen == [(4, 2, True, True)] * model.config.num_hidden_layers
        seen.clear()
        model(input_ids=ids, attention_mask=mask)  # transformers' own: keys and values repeated per query head
        assert seen == [(4, 4, True, False)] * model.config.num_hidden_layers


def test_an_error_inside_restores_the_attention():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="inside"):
        with hf.gqa_attention(model) as switched:
            assert switched
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case", ["eager", "one-query-head-per-kv-head"])
def test_other_models_are_left_alone(case):
    model = tiny_model("llama", config={"num_key_value_heads": 4} if case != "eager" else None)
    if case == "eager":
        model.set_attn_implementation("eager")
    impl = model.config._attn_implementation
    assert not attention.applies(model)
    with hf.gqa_attention(model) as switched:
        assert not switched and model.config._attn_implementation == impl


def test_without_the_interface_it_warns_once_and_changes_nothing(monkeypatch):
    def missing():
        raise ImportError("cannot import name 'AttentionInterface'")
    monkeypatch.setattr(attention, "_register", missing)
    monkeypatch.setattr(compat, "_warned", set())
    model = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match="attention interface"):
        with hf.gqa_attention(model) as switched:
            assert not switched and model.config._attn_implementation == "sdpa"

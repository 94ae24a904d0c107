"""Steering real transformers architectures (tiny random Llama, Qwen2, Gemma-2)."""
import pytest
import torch

import fastsplit
from fastsplit import hf
from fastsplit.nn import SteeredLinear
from tests.tiny import ARCHS, randomize, tiny_model, tiny_tokenizer

FORMS = ["vector", "lora", "local_weight"]
SITES = ["down_proj", "residual"]


def _batch(B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tiny_tokenizer()), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_multiplier_is_the_base_model(arch, form, site):
    model = tiny_model(arch)
    ids, mask = _batch()
    base = _logits(model, ids, mask)
    steering = fastsplit.attach(model, 2, form, rank=3, site=site)
    randomize(steering)
    with steering.multiplier(0.0):
        assert torch.equal(_logits(model, ids, mask), base)
    with steering.multiplier(torch.zeros(3)):
        assert torch.equal(_logits(model, ids, mask), base)
    with steering.multiplier(1.0):
        assert not torch.allclose(_logits(model, ids, mask), base)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_multiplier_equals_separate_runs(arch, site):
    model = tiny_model(arch)
    ids, mask = _batch()
    steering = fastsplit.attach(model, 1, "lora", rank=2, site=site)
    randomize(steering)
    ms = [-3.0, 0.5, 2.0]
    with steering.multiplier(torch.tensor(ms)):
        batched = _logits(model, ids, mask)
    for i, m in enumerate(ms):
        with steering.multiplier(m):
            alone = _logits(model, ids[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vector_at_down_proj_adds_to_the_residual_stream(arch):
    """On Llama/Qwen2 the down_proj vector is exactly m·v after layer L: the residual site agrees."""
    model = tiny_model(arch)
    ids, mask = _batch()
    a = fastsplit.attach(model, 2, "vector", site="down_proj")
    randomize(a)
    v = a.state_dict()["delta_bias"].clone()
    with a.multiplier(1.5):
        via_down = _logits(model, ids, mask)
    a.detach()
    b = fastsplit.attach(model, 2, "vector", site="residual")
    b.load_state_dict({"delta_bias": v})
    with b.multiplier(1.5):
        torch.testing.assert_close(_logits(model, ids, mask), via_down, atol=1e-5, rtol=1e-5)


def test_gemma2_sites_differ():
    model = tiny_model("gemma2")
    ids, mask = _batch()
    a = fastsplit.attach(model, 2, "vector", site="down_proj")
    randomize(a)
    v = a.state_dict()["delta_bias"].clone()
    via_down = _logits(model, ids, mask)
    a.detach()
    b = fastsplit.attach(model, 2, "vector", site="residual")
    b.load_state_dict({"delta_bias": v})
    assert not torch.allclose(_logits(model, ids, mask), via_down, atol=1e-4)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("arch", ARCHS)
def test_detach_restores_exactly(arch, site):
    model = tiny_model(arch)
    ids, mask = _batch()
    before_logits = _logits(model, ids, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    down = hf.decoder_layers(model)[2].mlp.down_proj
    steering = fastsplit.attach(model, 2, "local_weight", site=site)
    randomize(steering)
    assert (type(hf.decoder_layers(model)[2].mlp.down_proj) is SteeredLinear) == (site == "down_proj")
    steering.detach()
    assert hf.decoder_layers(model)[2].mlp.down_proj is down
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(_logits(model, ids, mask), before_logits)
    with pytest.raises(RuntimeError, match="detached"):
        steering.detach()


def test_parameters_and_double_attach():
    model = tiny_model("llama")
    s = fastsplit.attach(model, 0, "lora", rank=3)
    assert sorted(n for n, _ in s.named_parameters()) == ["delta_bias", "lora_a", "lora_b"]
    assert all(p.requires_grad for p in s.parameters())
    with pytest.raises(RuntimeError, match="already steered"):
        fastsplit.attach(model, 0, "vector")
    assert "rank=3" in repr(s)


@pytest.mark.parametrize("bad,msg", [(dict(layer=9), "layer must be an int"), (dict(form="prefix"), "form must be"),
                                     (dict(site="attn"), "site must be"), (dict(form="lora", rank=0), "rank must")])
def test_attach_bad_arguments(bad, msg):
    kw = dict(layer=1, form="vector") | bad
    with pytest.raises(ValueError, match=msg):
        fastsplit.attach(tiny_model("llama"), kw.pop("layer"), kw.pop("form"), **kw)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("form", FORMS)
def test_save_load_round_trip(tmp_path, form, site):
    model = tiny_model("qwen2")
    ids, mask = _batch()
    s = fastsplit.attach(model, 3, form, rank=2, site=site)
    randomize(s)
    with s.multiplier(1.3):
        expected = _logits(model, ids, mask)
    path = str(tmp_path / "steer.safetensors")
    s.save(path)
    s.detach()
    loaded = fastsplit.load_steering(model, path)
    assert (loaded.layer, loaded.form, loaded.site, loaded.rank) == (3, form, site, 2 if form == "lora" else None)
    with loaded.multiplier(1.3):
        torch.testing.assert_close(_logits(model, ids, mask), expected)


def test_load_checks_metadata(tmp_path):
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, "vector")
    path = str(tmp_path / "s.safetensors")
    s.save(path)
    s.detach()
    other = tiny_model("qwen2")
    with pytest.raises(ValueError, match="model='tiny-llama'"):
        fastsplit.load_steering(other, path)
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=384, hidden_size=48, intermediate_size=48,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    wide.config.name_or_path = "tiny-llama"
    with pytest.raises(ValueError, match="hidden_size='32'"):
        fastsplit.load_steering(wide, path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fastsplit steering file"):
        fastsplit.load_steering(model, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastsplit.load_steering(model, str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError):
        fastsplit.load_steering(model, str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_prefix_equals_full_forward(arch):
    """Running from layer L on captured inputs gives the full forward's final hidden states."""
    model = tiny_model(arch)
    ids, mask = _batch()
    mask[1, :3] = 1  # right padding is what training uses
    mask[1, -2:] = 0
    s = fastsplit.attach(model, 2, "vector")
    randomize(s)
    full = hf.decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    h_in = hf.capture_layer_input(model, 2, ids, mask)
    with hf.from_layer(model, 2, h_in):
        part = hf.decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(part[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert all(not isinstance(layer, hf.runner._PassThrough) for layer in hf.decoder_layers(model))

"""SPLIT training on tiny models: one fused forward per step, cached prefix, checkpoints and resume."""
import pytest
import torch

import fastsplit
from fastsplit import hf
from tests.tiny import tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:12]


def _train(model, steering, **kw):
    opts = dict(epochs=2, batch_size=4, lr=5e-2, steering_factors=[0.5, 1.0, 2.0], progress=False, seed=1)
    return fastsplit.train(model, tiny_tokenizer(), steering, PAIRS, **(opts | kw))


@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_split_training_lowers_the_loss(arch, form):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = fastsplit.attach(model, 2, form, rank=2)
    out = _train(model, s, epochs=4, pair_types=("add", "sub"))
    hist = out["history"]
    assert len(hist) == 4 and out["steps"] == 4 * 3
    assert hist[-1]["loss"] < hist[0]["loss"]
    s.detach()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the intervention was trained


def test_one_forward_per_step_and_no_hf_logits():
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, "vector")
    calls = {"norm": 0}
    h1 = hf.decoder(model).norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1))

    def no_logits(*a):
        raise AssertionError("lm_head was called: training must not build HF logits")
    h2 = model.lm_head.register_forward_hook(no_logits)
    _train(model, s, epochs=1, cache_prefix=False)
    h1.remove()
    h2.remove()
    assert calls["norm"] == 3  # 12 pairs / batch 4: positive and negative rows share each forward


def test_cached_prefix_gives_the_same_training():
    results = []
    for cache in (False, True):
        model = tiny_model("qwen2")
        s = fastsplit.attach(model, 2, "lora", rank=2)
        torch.manual_seed(5)
        torch.nn.init.normal_(s.module.lora_a)
        _train(model, s, cache_prefix=cache)
        results.append(s.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    def fresh():
        model = tiny_model("llama")
        s = fastsplit.attach(model, 2, "lora", rank=2)
        torch.manual_seed(9)
        torch.nn.init.normal_(s.module.lora_a)
        return model, s

    model, s = fresh()
    _train(model, s, epochs=3, checkpoint_dir=str(tmp_path / "a"))
    full = s.state_dict()
    model, s = fresh()
    _train(model, s, epochs=3, checkpoint_dir=str(tmp_path / "b"))
    (tmp_path / "b" / "checkpoint-epoch3.pt").unlink()
    (tmp_path / "b" / "checkpoint-epoch2.pt").unlink()  # as if stopped after epoch 1
    model, s = fresh()
    out = _train(model, s, epochs=3, checkpoint_dir=str(tmp_path / "b"), resume=True)
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    for k, v in s.state_dict().items():
        assert torch.equal(v, full[k]), k
    model, s = fresh()
    with pytest.raises(ValueError, match="other settings"):
        _train(model, s, epochs=3, lr=1e-3, checkpoint_dir=str(tmp_path / "b"), resume=True)


def test_sft_and_pair_reduction_run():
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, "vector")
    assert _train(model, s, loss="sft", epochs=1)["steps"] == 3
    assert _train(model, s, reduction="pair", epochs=1, grad_accum=2)["steps"] == 2


@pytest.mark.parametrize("kw,msg", [(dict(loss="dpo"), "loss must be"), (dict(pair_types=("mul",)), "pair_types"),
                                    (dict(steering_factors=[float("nan")]), "steering_factors"),
                                    (dict(batch_size=0), "batch_size")])
def test_bad_options(kw, msg):
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, "vector")
    with pytest.raises(ValueError, match=msg):
        _train(model, s, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_train_like_separate_rows(arch):
    """One row per pair (prompt once, the negative masked from the positive) gives the per-side result."""
    results = []
    for pack in (False, True):
        model = tiny_model(arch, init_std=0.15)  # attention far from uniform, so a leak into the mask shows
        s = fastsplit.attach(model, 2, "lora", rank=2)
        torch.manual_seed(5)
        torch.nn.init.normal_(s.module.lora_a)
        out = _train(model, s, pack_pairs=pack, pair_types=("add", "sub"), reduction="pair")
        results.append((s.state_dict(), out["history"]))
    for k in results[0][0]:
        torch.testing.assert_close(results[0][0][k], results[1][0][k], atol=1e-5, rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        assert abs(a["pref_log_odds"] - b["pref_log_odds"]) < 1e-4


def test_short_sliding_window_turns_packing_off():
    enc = [fastsplit.encode_pair(tiny_tokenizer(), p) for p in PAIRS]
    assert not hf.packable(tiny_model("gemma2"), enc)  # window 8 is shorter than a packed row
    assert hf.packable(tiny_model("llama"), enc)


def test_tokens_outside_the_vocabulary_are_refused_before_the_model_runs():
    tok = tiny_tokenizer()
    model = tiny_model("llama", config={"vocab_size": 50})  # smaller than the tokenizer's
    s = fastsplit.attach(model, 1, "vector")
    with pytest.raises(ValueError, match=r"pair 0 .* outside the model's vocabulary of 50"):
        fastsplit.train(model, tok, s, fastsplit.demo_pairs()[:4], progress=False)


def test_a_nan_loss_names_the_first_bad_pair():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    with torch.no_grad():
        s.module.delta_bias[3] = float("nan")  # every row NaN from the steered layer on
    with pytest.raises(RuntimeError, match=r"not finite at epoch 1, batch 1: first bad pair is #\d+"):
        fastsplit.train(model, tok, s, fastsplit.demo_pairs()[:6], batch_size=3, progress=False)

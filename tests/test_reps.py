"""RePS (Wu et al. 2025) through the fused loss, against a direct float64 implementation of the paper's equations
on a tiny model: the loss value and its gradient; the nulling intervention; sequence_nll; training; refusals."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastsplit
from fastsplit import hf
from fastsplit.data import encode_pair
from fastsplit.ops.split_loss import sequence_nll
from tests.tiny import randomize, tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:6]
train_mod = importlib.import_module("fastsplit.train")  # the module (fastsplit.train is the function)


def _log_prob(model, prompt, comp):
    """Summed and mean log-probability of ``comp`` after ``prompt``: full logits, log_softmax (the direct way)."""
    ids = torch.tensor([prompt + comp])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)
    tok = logp.gather(1, torch.tensor(comp)[:, None]).squeeze(1)
    return tok.sum(), tok.mean()


def _direct(model, steering, enc, ms):
    """The paper's RePS loss, written out: Δ+ = β+·(1/|y_c|)·log p(y_c) − (1/|y|)·log p(y) at +m, Δ− = β−·(1/|y|)·
    log p(y) − (1/|y_c|)·log p(y_c) under the nulling intervention, β from the unsteered model, mean of
    −log σ(Δ+) − log σ(Δ−)."""
    losses = []
    layer = hf.decoder_layers(model)[steering.layer]
    for (prompt, pos, neg), m in zip(enc, ms):
        with torch.no_grad(), steering.multiplier(0.0):
            s_c, _ = _log_prob(model, prompt, pos)
            s_y, _ = _log_prob(model, prompt, neg)
        beta_pos, beta_neg = max(float(s_y - s_c), 1.0), max(float(s_c - s_y), 1.0)
        with steering.multiplier(m):
            _, c_plus = _log_prob(model, prompt, pos)
            _, y_plus = _log_prob(model, prompt, neg)
        if steering.form == "vector":
            d = steering.module.delta_bias

            def null(mod, args, out):
                h = out[0] if isinstance(out, tuple) else out
                u = d / d.norm()
                h = h - torch.relu(h @ u)[..., None] * u
                return (h, *out[1:]) if isinstance(out, tuple) else h
            handle = layer.register_forward_hook(null)
            with steering.multiplier(0.0):
                _, c_null = _log_prob(model, prompt, pos)
                _, y_null = _log_prob(model, prompt, neg)
            handle.remove()
        else:
            with steering.multiplier(-m):
                _, c_null = _log_prob(model, prompt, pos)
                _, y_null = _log_prob(model, prompt, neg)
        delta_pos = beta_pos * c_plus - y_plus
        delta_neg = beta_neg * y_null - c_null
        losses.append(-F.logsigmoid(delta_pos) - F.logsigmoid(delta_neg))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_reps_matches_the_papers_equations_in_float64(form):
    model = tiny_model("llama").double()
    tok = tiny_tokenizer()
    steering = fastsplit.attach(model, 2, form, rank=2)
    randomize(steering, scale=0.3)
    model.requires_grad_(False)
    enc = [encode_pair(tok, p) for p in PAIRS]
    ms = [1.5, 0.5, 2.0, 1.0, 1.5, 0.75]
    params = steering.parameters()
    for p in params:
        p.requires_grad_(True)
    expect = _direct(model, steering, enc, ms)
    g_expect = torch.autograd.grad(expect, params)
    layout = hf.PackedRows(enc, hf.pad_id_of(tok), torch.float64)
    head, cap = hf.lm_head(model), hf.logit_softcap(model)
    idx = list(range(len(PAIRS)))
    m = torch.tensor(ms, dtype=torch.float64)
    betas = train_mod._reps_betas(model, steering, layout, True, idx, torch.device("cpu"), head, cap, 4, torch.float64)
    beta = torch.tensor([betas[i] for i in idx], dtype=torch.float64)
    terms = train_mod._reps_terms(model, steering, layout, True, idx, m, torch.device("cpu"), head, cap)
    got = train_mod.reps_loss(*terms, beta[:, 0], beta[:, 1]).mean()
    with torch.no_grad():
        for t, name in zip(terms, ("P", "N", "P_null", "N_null")):  # the four terms differ: each is exercised
            assert t.std() > 0, name
    g_got = torch.autograd.grad(got, params)
    assert abs(float(got) - float(expect)) < 1e-10
    for a, e in zip(g_got, g_expect):
        assert e.abs().max() > 0
        # Each term's gradient matches to 1e-15; the loss weighs them by β (up to ~12 here) with opposite signs, so
        # the sum cancels and float64 rounding shows at ~1e-8 of the largest element: far below any real error.
        torch.testing.assert_close(a, e, atol=1e-6 * float(e.abs().max()), rtol=1e-6)


def test_nulling_removes_the_positive_component_only():
    model = tiny_model("llama")
    s = fastsplit.attach(model, 1, "vector")
    randomize(s)
    seen = {}  # what the next layer receives
    h = hf.decoder_layers(model)[2].register_forward_pre_hook(lambda mod, a, kw: seen.__setitem__("h", a[0] if a else
                                                                                                   kw["hidden_states"]),
                                                            with_kwargs=True)
    ids = torch.randint(3, 300, (2, 7))
    with s.nulling():
        model(input_ids=ids)
    h.remove()
    out = seen["h"]
    u = s.module.delta_bias / s.module.delta_bias.norm()
    assert float((out @ u).max()) <= 1e-5  # no positive component left along the vector
    assert float((out @ u).min()) < -1e-3  # negative components stay
    with pytest.raises(ValueError, match="vector form"):
        with fastsplit.attach(model, 2, "lora").nulling():
            pass


def test_sequence_nll_equals_cross_entropy_and_checks_rows():
    H, V = 12, 40
    W = torch.randn(V, H, dtype=torch.float64)
    h = torch.randn(3, 6, H, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, V, (3, 6))
    lab[:, :2] = -100
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for red in ("mean", "sum"):
        got = sequence_nll(h, W, lab, reduction=red)
        tgt = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], -100)], 1)
        nll = F.cross_entropy((h @ W.t()).flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
        want = nll.view(3, 6).sum(1) / ((tgt != -100).sum(1) if red == "mean" else 1)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        ga, = torch.autograd.grad((got * weights).sum(), [h])
        gb, = torch.autograd.grad((want * weights).sum(), [h])
        torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)
    lab[1] = -100
    with pytest.raises(ValueError, match="row 1 of labels has no unmasked target"):
        sequence_nll(h, W, lab)
    with pytest.raises(ValueError, match="reduction"):
        sequence_nll(h, W, lab, reduction="max")


@pytest.mark.parametrize("form", ["vector", "lora"])
def test_reps_training_lowers_its_loss_and_records_the_objective(form):
    model = tiny_model("llama")
    s = fastsplit.attach(model, 2, form, rank=2)
    out = fastsplit.train(model, tiny_tokenizer(), s, fastsplit.demo_pairs()[:12], loss="reps", epochs=4,
                          batch_size=4, lr=5e-2, steering_factors=[1.0, 2.0], progress=False, seed=1)
    hist = out["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] and s.objective == "reps"
    with pytest.raises(ValueError, match="pair_types must be"):
        fastsplit.train(model, tiny_tokenizer(), s, PAIRS, loss="reps", pair_types=("add", "sub"), progress=False)

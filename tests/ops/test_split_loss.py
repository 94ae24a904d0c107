"""split_loss on every backend against the float64 full-logits reference: loss, parts, every gradient."""
import pytest
import torch

from fastsplit import SplitLoss, split_loss, split_loss_ref
from fastsplit import native
from tests.helpers import DEVICE, TOL, assert_close, assert_close_fa, backend_cases

B, TP, TN, H = 3, 11, 7, 40


def make_case(V, dtype, *, bias=False, train_head=False, device=DEVICE):
    """Random hidden states and labels: masked prompts, T_pos != T_neg, row 2 padded on the positive side."""
    g = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(device, dtype)
    t = {"hidden_pos": g(B, TP, H).requires_grad_(), "hidden_neg": g(B, TN, H).requires_grad_(),
         "lm_head_weight": g(V, H, scale=0.4).requires_grad_(train_head),
         "lm_head_bias": g(V).requires_grad_(train_head) if bias else None}
    lp = torch.randint(0, V, (B, TP), device=device)
    ln = torch.randint(0, V, (B, TN), device=device)
    lp[:, :4] = -100  # prompt tokens
    ln[:, :3] = -100
    lp[2, 8:] = -100  # a padded row
    return t, lp, ln


def run(fn, t, lp, ln, **kw):
    loss, parts = fn(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln,
                     lm_head_bias=t["lm_head_bias"], return_parts=True, **kw)
    leaves = [k for k, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(loss, [t[k] for k in leaves])
    return loss, parts, dict(zip(leaves, grads))


def check(backend, dtype, V, *, bias=False, train_head=False, **kw):
    """Loss, parts and every gradient against the float64 reference; a kernel in a low precision by
    flash-attention's rule (its error at most 3x the torch path's in that dtype), the torch path by TOL."""
    t, lp, ln = make_case(V, dtype, bias=bias, train_head=train_head)
    loss, parts, grads = run(lambda *a, **k: split_loss(*a, backend=backend, **k), t, lp, ln, **kw)
    fresh = lambda dt=None: {k: (v.detach().to(dt or v.dtype).requires_grad_(v.requires_grad) if v is not None
                                 else None) for k, v in t.items()}
    loss_r, parts_r, grads_r = run(split_loss_ref, fresh(torch.float64), lp, ln, **kw)
    same = None if backend == "torch" else run(lambda *a, **k: split_loss(*a, backend="torch", **k), fresh(), lp, ln,
                                               **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(parts["hinge_active"].cpu(), parts_r["hinge_active"].cpu())
    assert set(grads) == set(grads_r)
    checks = [("loss", loss, loss_r, same and same[0])]
    checks += [(k, parts[k], parts_r[k], same and same[1][k]) for k in ("pos", "neg", "pref_log_odds")]
    checks += [(f"d{k}", grads[k], grads_r[k], same and same[2][k]) for k in grads]
    for name, got, ref, base in checks:
        if name.startswith("d"):
            assert got.dtype == t[name[1:]].dtype
        if same is None:
            assert_close(got, ref, dtype, name)
        else:
            assert_close_fa(got, ref, base, name)
    return parts


@pytest.mark.parametrize("backend,dtype", backend_cases((torch.bfloat16,)))
@pytest.mark.parametrize("theta", [50.0, -50.0], ids=["hinge-on", "hinge-off"])
@pytest.mark.parametrize("reduction", ["batch", "pair"])
@pytest.mark.parametrize("V", [1000, 2053, 4099], ids=lambda v: f"V{v}")
def test_matches_reference(backend, dtype, V, reduction, theta):
    parts = check(backend, dtype, V, reduction=reduction, theta=theta, gamma=3.0, lambda_n=0.7)
    assert bool(parts["hinge_active"].all()) == (theta > 0)  # both branches really exercised
    if reduction == "pair":
        assert parts["pos"].shape == (B,)


@pytest.mark.parametrize("backend,dtype", backend_cases((torch.bfloat16,)))
@pytest.mark.parametrize("reduction", ["batch", "pair"])
def test_softcap_bias_trainable_head(backend, dtype, reduction):
    check(backend, dtype, 2053, bias=True, train_head=True, logit_softcap=3.0, reduction=reduction)


@pytest.mark.parametrize("backend,dtype", backend_cases((torch.bfloat16,)))
def test_no_shift_and_mixed_hinge(backend, dtype):
    parts = check(backend, dtype, 1000, shift=False, reduction="pair", theta=0.0)
    assert parts["hinge_active"].numel() == B


def test_triton_chunks_agree():
    """Small chunks push the Triton launcher through several workspace refills."""
    from fastsplit.kernels.split_loss import split_loss_fwd
    from fastsplit.ops.split_loss import split_loss_fwd_torch

    h = torch.randn(45, H, device=DEVICE)
    W = torch.randn(1000, H, device=DEVICE) * 0.4
    tgt = torch.randint(0, 1000, (45,), device=DEVICE)
    ref = split_loss_fwd_torch(h.double(), tgt, W.double(), None, None, True)
    for chunk in (16, 0):
        out = split_loss_fwd(h, tgt, W, None, None, True, chunk)
        for a, b, name in zip(out, ref, ("nll", "lse", "dh")):
            assert_close(a, b, torch.float32, f"{name} chunk={chunk}")


def test_module_matches_function():
    t, lp, ln = make_case(1000, torch.float32)
    crit = SplitLoss(gamma=2.0, theta=0.1, reduction="pair")
    a = crit(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln)
    b = split_loss(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln, gamma=2.0, theta=0.1,
                   reduction="pair")
    torch.testing.assert_close(a, b)
    assert "reduction=pair" in repr(crit)


def test_frozen_head_gets_no_gradient():
    t, lp, ln = make_case(1000, torch.float32)
    loss = split_loss(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln)
    loss.backward()
    assert t["lm_head_weight"].grad is None and t["hidden_pos"].grad is not None


def test_ce_parts_match_cut_cross_entropy():
    cce = pytest.importorskip("cut_cross_entropy")
    t, lp, ln = make_case(2053, torch.float32, device="cpu")
    _, parts = split_loss(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln, reduction="pair",
                          return_parts=True, backend="torch")
    for side, h, lab in (("pos", t["hidden_pos"], lp), ("neg", t["hidden_neg"], ln)):
        tok = cce.linear_cross_entropy(h.detach(), t["lm_head_weight"].detach(), lab, impl="torch_compile",
                                       reduction="none", shift=True)  # [B, T-1]
        valid = (lab[:, 1:] != -100).float()
        per_row = (tok * valid).sum(1) / valid.sum(1)
        torch.testing.assert_close(parts[side], per_row, **TOL[torch.float32])


# Value errors (the first three) read device data, so they need fastsplit.set_debug(True); the others are
# metadata checks and always run.
DATA_ERRORS = ("pair-empty-row", "batch-empty-side", "label-range")
BAD = {
    "pair-empty-row": (dict(mask_row=1), dict(reduction="pair"), "row 1 has no unmasked target token"),
    "batch-empty-side": (dict(mask_all_neg=True), {}, "negative side has no unmasked target"),
    "label-range": (dict(bad_label=True), {}, r"labels_pos\[0, 5\] = 5000 is outside \[0, V=1000\)"),
    "batch-mismatch": (dict(neg_batch=2), {}, "hidden_neg has batch 2"),
    "hidden-mismatch": (dict(neg_hidden=41), {}, "hidden sizes differ"),
    "reduction": ({}, dict(reduction="sum"), "reduction must be one of"),
    "labels-shape": (dict(short_labels=True), {}, "labels_neg must have shape"),
}


def _bad_case(case):
    change, kw, message = BAD[case]
    V = 1000
    hp, hn = torch.randn(B, TP, H), torch.randn(change.get("neg_batch", B), TN, change.get("neg_hidden", H))
    lp, ln = torch.randint(0, V, (B, TP)), torch.randint(0, V, (hn.shape[0], TN))
    if "mask_row" in change:
        lp[change["mask_row"]] = -100
    if change.get("mask_all_neg"):
        ln[:] = -100
    if change.get("bad_label"):
        lp[0, 5] = 5000
    if change.get("short_labels"):
        ln = ln[:, :-1]
    return (hp, hn, torch.randn(V, H), lp, ln), kw, message


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case, debug_mode):
    args, kw, message = _bad_case(case)
    with pytest.raises((ValueError, TypeError), match=message):
        split_loss(*args, backend="torch", **kw)


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_values_without_debug_give_nan_not_a_number(case):
    """Without the debug switch a value error is never silent: the loss is NaN (and nothing synchronised)."""
    args, kw, _ = _bad_case(case)
    loss = split_loss(*args, backend="torch", **kw)
    assert torch.isnan(loss)


@pytest.mark.skipif(native._C is None, reason="extension not built")
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "softcap"])
def test_native_opcheck(softcap):
    h = torch.randn(9, H, device=DEVICE)
    W = torch.randn(1000, H, device=DEVICE) * 0.4
    tgt = torch.randint(0, 1000, (9,), device=DEVICE)
    torch.library.opcheck(native.split_loss_fwd, (h, tgt, W, torch.randn(1000, device=DEVICE), softcap, True, 4))

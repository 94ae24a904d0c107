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


@pytest.mark.parametrize("backend,dtype", backend_cases(()))  # the layout, not the precision: f64/f32
@pytest.mark.parametrize("merge", [True, False], ids=["one-launch", "launch-per-side"])
@pytest.mark.parametrize("frozen", [None, "hidden_neg"], ids=["both-trained", "neg-frozen"])
def test_sides_in_one_launch_or_two(backend, dtype, merge, frozen, monkeypatch):
    """Few rows run both sides in one launch (the head read once), many rows a launch per side: both layouts give
    the reference's loss and gradients, also when only one side needs its gradient."""
    from fastsplit.ops import split_loss as sl

    monkeypatch.setattr(sl, "_MERGE_ROWS", 10 ** 9 if merge else 0)
    t, lp, ln = make_case(1000, dtype, bias=True)
    if frozen:
        t[frozen].requires_grad_(False)
    loss, parts, grads = run(lambda *a, **k: split_loss(*a, backend=backend, **k), t, lp, ln, logit_softcap=3.0)
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}
    loss_r, parts_r, grads_r = run(split_loss_ref, ref, lp, ln, logit_softcap=3.0)
    assert set(grads) == set(grads_r) == ({"hidden_pos", "hidden_neg"} - {frozen})
    assert_close(loss, loss_r, dtype, "loss")
    for k in ("pos", "neg"):
        assert_close(parts[k], parts_r[k], dtype, k)
    for k in grads:
        assert_close(grads[k], grads_r[k], dtype, f"d{k}")


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "softcap"])
def test_fused_chunks_agree(softcap):
    """Small chunks push the fused launcher through several reuses of its one logits buffer (a chunk of 16
    rows, then the 13 left: the buffer's tail from the previous chunk must not leak)."""
    from fastsplit.kernels.split_loss import fused_split_fwd
    from fastsplit.ops.split_loss import split_loss_fwd_torch

    h = torch.randn(45, H, device=DEVICE)
    W = torch.randn(1000, H, device=DEVICE) * 0.4
    b = torch.randn(1000, device=DEVICE)
    tgt = torch.randint(0, 1000, (45,), device=DEVICE)
    ref = split_loss_fwd_torch(h.double(), tgt, W.double(), b.double(), softcap, True)
    for chunk in (16, 45, 1000):
        out = fused_split_fwd(h, tgt, W, b, softcap, True, chunk)
        for a, r, name in zip(out, ref, ("nll", "lse", "dh")):
            assert_close(a, r, torch.float32, f"{name} chunk={chunk}")
    nll, lse, dh = fused_split_fwd(h, tgt, W, b, softcap, False, 16)
    assert dh.numel() == 0
    assert_close(nll, ref[0], torch.float32, "nll without dH")
    # The path torch.compile traces (wrap_triton, fresh tensors per chunk, one concatenation), run eagerly.
    for a, r, name in zip(fused_split_fwd(h, tgt, W, b, softcap, True, 16, traced=True), ref, ("nll", "lse", "dh")):
        assert_close(a, r, torch.float32, f"traced {name}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_large_vocabulary_against_float64(backend):
    """V 32771 (odd, > 32000) with few rows: a long row through the fused pass's two sweeps, loss and dH against
    the float64 full-logits reference."""
    V, Hs = 32771, 24
    g = torch.Generator().manual_seed(3)
    hp = torch.randn(2, 5, Hs, generator=g, dtype=torch.float64)
    hn = torch.randn(2, 4, Hs, generator=g, dtype=torch.float64)
    W = torch.randn(V, Hs, generator=g, dtype=torch.float64) * 0.5
    lp, ln = torch.randint(0, V, (2, 5), generator=g), torch.randint(0, V, (2, 4), generator=g)
    lp[0, 1] = V - 1  # the last vocabulary entry, in the last (partial) block of a row
    ref = {}
    for name, dt in (("ref", torch.float64), ("run", torch.float32)):
        a, b = hp.to(DEVICE, dt).requires_grad_(), hn.to(DEVICE, dt).requires_grad_()
        fn = split_loss_ref if name == "ref" else (lambda *x, **k: split_loss(*x, backend=backend, **k))
        loss = fn(a, b, W.to(DEVICE, dt), lp.to(DEVICE), ln.to(DEVICE), reduction="pair", theta=5.0)
        ref[name] = (loss, *torch.autograd.grad(loss, [a, b]))
    for got, want, what in zip(ref["run"], ref["ref"], ("loss", "dhidden_pos", "dhidden_neg")):
        assert_close(got, want, torch.float32, what)


@pytest.mark.gpu
def test_gemma_vocabulary_on_the_gpu():
    """V 256000 (Gemma-2) in bf16 on a GPU: loss and dH of a few rows within flash-attention's rule."""
    V, Hs = 256000, 256
    g = torch.Generator().manual_seed(4)
    hp = torch.randn(2, 9, Hs, generator=g, dtype=torch.float64)
    hn = torch.randn(2, 7, Hs, generator=g, dtype=torch.float64)
    W = torch.randn(V, Hs, generator=g, dtype=torch.float64) * Hs ** -0.5
    lp, ln = torch.randint(0, V, (2, 9), generator=g), torch.randint(0, V, (2, 7), generator=g)
    out = {}
    for name, dt, fn in (("ref", torch.float64, split_loss_ref), ("same", torch.bfloat16, split_loss_ref),
                         ("run", torch.bfloat16, lambda *x, **k: split_loss(*x, **k))):
        a, b = hp.cuda().to(dt).requires_grad_(), hn.cuda().to(dt).requires_grad_()
        loss = fn(a, b, W.cuda().to(dt), lp.cuda(), ln.cuda(), reduction="pair", logit_softcap=30.0)
        out[name] = (loss, *torch.autograd.grad(loss, [a, b]))
    for got, want, base, what in zip(out["run"], out["ref"], out["same"], ("loss", "dpos", "dneg")):
        assert_close_fa(got, want, base, what)


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


# Value errors (the first three) read the data: always on CPU tensors, on CUDA only with fastsplit.set_debug(True);
# the others are metadata checks and always run.
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_values_on_cpu_tensors_raise_without_debug(case, backend):
    """Reading a CPU tensor costs no device sync, so these checks always run there (3 cases that once returned
    NaN without a word)."""
    args, kw, message = _bad_case(case)
    with pytest.raises(ValueError, match=message):
        split_loss(*args, backend=backend, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_values_on_cuda_without_debug_give_nan_not_a_number(case):
    """On CUDA without the debug switch a value error is never silent: the loss is NaN (and nothing synced)."""
    args, kw, _ = _bad_case(case)
    loss = split_loss(*(a.cuda() for a in args), **kw)
    assert torch.isnan(loss)


@pytest.mark.skipif(native._C is None, reason="extension not built")
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "softcap"])
def test_native_opcheck(softcap):
    h = torch.randn(9, H, device=DEVICE)
    W = torch.randn(1000, H, device=DEVICE) * 0.4
    tgt = torch.randint(0, 1000, (9,), device=DEVICE)
    torch.library.opcheck(native.split_loss_fwd, (h, tgt, W, torch.randn(1000, device=DEVICE), softcap, True, 4))

"""The SPLIT loss ``λp·L_pos + λn·L_neg + γ·ReLU(θ − (L_neg − L_pos))`` over an lm_head, fused.

Flow: every token row goes to a forward launcher, both sides' rows in one launch while they are few (the head is
then read once), a launch per side above that. Masked rows take a dummy target and get a zero coefficient
(gathering only the unmasked rows would give a data-dependent shape, which synchronises with the host: callers
with many masked rows gather them themselves, as ``fastsplit.train`` does with
``fastsplit.hf.completion_positions``). The launcher returns per-token NLL, log-sum-exp and the *unscaled* gradient
``dH = (softmax − onehot)·W`` (computed in the forward, tile by tile, so the [tokens × vocab] logits never exist);
``_reduce`` turns the NLLs into the loss and each row's coefficient ``∂loss/∂NLL``; backward only rescales dH by it
(dH is linear in the coefficient). A trainable lm_head gets its gradient from a chunked recompute in backward.

``split_loss_ref`` is the naive full-logits reference (test oracle, benchmark baseline).
``split_loss_fwd_torch`` is the chunked torch launcher (the CPU path); ``backend="triton"`` (``auto`` on CUDA) is
cuBLAS GEMMs around one fused Triton pass per chunk (``fastsplit.kernels.split_loss``); ``"native"`` the same
GEMMs around the compiled extension's epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _env
from . import _backend, _tune
from ._checks import check_tensor, value_checks
from ._chunks import chunk_rows as _chunk_rows
from ._chunks import fused_chunk_rows, spans

__all__ = ["split_loss", "split_loss_ref", "SplitLossFunction", "sequence_nll", "SequenceNLLFunction", "REDUCTIONS"]

REDUCTIONS = ("batch", "pair")


def _targets(labels: Tensor, shift: bool, ignore_index: int) -> Tensor:
    """[B, T] target per hidden position: labels[:, t+1] with shift (the last one ignored)."""
    if not shift:
        return labels
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _acc_dtype(h: Tensor) -> torch.dtype:
    """Accumulate in fp32, or fp64 when the inputs are fp64 (the oracle)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _capped_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float], acc: torch.dtype):
    """Logits of one chunk in ``acc`` (soft-capped in place), and d(cap)/dz from the capped value, or None."""
    z = F.linear(h, weight, bias).to(acc)
    if not softcap:
        return z, None
    z = z.div_(softcap).tanh_()
    cap_grad = 1.0 - z * z  # d(c·tanh(z/c))/dz
    return z.mul_(softcap), cap_grad


def split_loss_ref(hidden_pos, hidden_neg, lm_head_weight, labels_pos, labels_neg, *, lambda_p=1.0,
                   lambda_n=0.5, gamma=5.0, theta=0.4, reduction="batch", ignore_index=-100, shift=True,
                   lm_head_bias=None, logit_softcap=None, return_parts=False):
    """Naive SPLIT loss: full logits on both sides, ``F.cross_entropy``, hinge; autograd for gradients.

    Same contract as :func:`split_loss`; computes in the inputs' dtype (use float64 as an oracle).
    """
    means = []
    for h, lab in ((hidden_pos, labels_pos), (hidden_neg, labels_neg)):
        z = F.linear(h, lm_head_weight, lm_head_bias)
        if logit_softcap:
            z = logit_softcap * torch.tanh(z / logit_softcap)
        tgt = _targets(lab, shift, ignore_index)
        nll = F.cross_entropy(z.flatten(0, 1), tgt.flatten(), ignore_index=ignore_index, reduction="none")
        nll = nll.view(tgt.shape)
        valid = (tgt != ignore_index).to(nll.dtype)
        if reduction == "batch":
            means.append(nll.sum() / valid.sum())
        else:
            means.append(nll.sum(1) / valid.sum(1))
    pos, neg = means
    pref = neg - pos
    hinge = torch.relu(theta - pref)
    per = lambda_p * pos + lambda_n * neg + gamma * hinge
    loss = per if reduction == "batch" else per.mean()
    if not return_parts:
        return loss
    return loss, {"pos": pos, "neg": neg, "pref_log_odds": pref, "hinge_active": theta - pref > 0}


def split_loss_fwd_torch(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor],
                         softcap: Optional[float], need_dh: bool, chunk_rows: int = 0):
    """Chunked torch launcher. ``h`` [N, H], ``tgt`` [N] in [0, V).

    Returns (nll [N] fp32, lse [N] fp32, dH [N, H] fp32 or an empty tensor), holding at most one
    [chunk × V] block of logits at a time (``chunk_rows``; 0 derives it from the device).
    """
    N, V = h.shape[0], weight.shape[0]
    chunk = chunk_rows or _chunk_rows(N, V, h.shape[1], h.device)
    acc = _acc_dtype(h)
    nll = torch.empty(N, device=h.device, dtype=acc)
    lse = torch.empty(N, device=h.device, dtype=acc)
    dh = torch.empty((N, h.shape[1]) if need_dh else (0,), device=h.device, dtype=acc)
    for s, e in spans(N, chunk):
        rows = torch.arange(e - s, device=h.device)
        t = tgt[s:e]
        z, cap_grad = _capped_logits(h[s:e], weight, bias, softcap, acc)
        # log-sum-exp in place over the one logits buffer: no [chunk × V] temporaries.
        z_t = z[rows, t]
        top = z.max(dim=1).values
        total = z.sub_(top[:, None]).exp_().sum(dim=1)
        lse[s:e] = top + total.log()
        nll[s:e] = lse[s:e] - z_t
        if need_dh:
            p = z.div_(total[:, None])  # softmax
            p[rows, t] -= 1.0
            if cap_grad is not None:
                p.mul_(cap_grad)
            dh[s:e] = p.to(weight.dtype) @ weight
    return nll, lse, dh


def _weight_grad_torch(h, tgt, weight, bias, softcap, lse, coef, need_w, need_b, chunk_rows=0):
    """dW = Σ coef·gᵀh and db = Σ coef·g, recomputing the logits chunk by chunk (trainable lm_head)."""
    V = weight.shape[0]
    chunk = chunk_rows or _chunk_rows(h.shape[0], V, h.shape[1], h.device)
    acc = _acc_dtype(h)
    dW = torch.zeros(weight.shape, device=h.device, dtype=acc) if need_w else None
    db = torch.zeros(V, device=h.device, dtype=acc) if need_b else None
    for s, e in spans(h.shape[0], chunk):
        rows = torch.arange(e - s, device=h.device)
        z, cap_grad = _capped_logits(h[s:e], weight, bias, softcap, acc)
        g = z.sub_(lse[s:e, None]).exp_()
        g[rows, tgt[s:e]] -= 1.0
        if cap_grad is not None:
            g.mul_(cap_grad)
        g.mul_(coef[s:e, None])
        if need_w:
            dW += g.t() @ h[s:e].to(acc)
        if need_b:
            db += g.sum(0)
    return dW, db


def _reduce(nll_p, rows_p, nll_n, rows_n, B: int, reduction: str, lp: float, ln: float, gamma: float,
            theta: float):
    """Loss, parts, and the per-token coefficients ∂loss/∂nll for each side. ``rows_*`` [n] hold each token's
    batch row, or -1 for a masked token (not counted; coefficient 0). No host sync: counts stay on the device."""
    dt = nll_p.dtype
    means, counts, valids = [], [], []
    for nll, rows in ((nll_p, rows_p), (nll_n, rows_n)):
        valid = rows >= 0
        kept = torch.where(valid, nll, torch.zeros((), device=nll.device, dtype=dt))
        if reduction == "batch":
            cnt = valid.sum().to(dt)
            means.append(kept.sum() / cnt)
        else:
            idx = rows.clamp(min=0)
            cnt = torch.zeros(B, device=nll.device, dtype=dt).index_add_(0, idx, valid.to(dt))
            means.append(torch.zeros(B, device=nll.device, dtype=dt).index_add_(0, idx, kept) / cnt)
        counts.append(cnt)
        valids.append(valid)
    pos, neg = means
    pref = neg - pos
    active = theta - pref > 0
    a = active.to(dt)
    per = lp * pos + ln * neg + gamma * torch.relu(theta - pref)
    n = 1 if reduction == "batch" else B
    loss = per if reduction == "batch" else per.mean()
    coefs = []
    for lam, sign, cnt, rows, valid in ((lp, 1.0, counts[0], rows_p, valids[0]), (ln, -1.0, counts[1], rows_n, valids[1])):
        c = (lam + sign * gamma * a) / (n * cnt)
        c = c.expand(rows.shape) if reduction == "batch" else c[rows.clamp(min=0)]
        coefs.append(torch.where(valid, c, torch.zeros((), device=c.device, dtype=dt)))
    return loss, (pos, neg, pref, active), coefs[0], coefs[1]


_MERGE_ROWS = 2048  # rows of both sides up to which one launch serves both (the head read once)


def launch_rows(n_pos: int, n_neg: int) -> list[int]:
    """Token rows of each launch for sides of ``n_pos`` and ``n_neg`` rows: both in one launch up to
    ``_MERGE_ROWS`` (a small pass is bound by reading the head, so it reads it once), else one per side."""
    return [n_pos + n_neg] if n_pos + n_neg <= _MERGE_ROWS else [n_pos, n_neg]


def _launcher(backend: str, h: Tensor, V: int, chunk: int = 0):
    """(launcher, chunk rows) of ``backend`` for rows ``h`` [n, H] over a vocabulary of V; ``chunk`` 0: the static
    rule of the backend (``_chunks``)."""
    n, H = h.shape
    if chunk:
        pass
    elif backend == "triton":
        chunk = fused_chunk_rows(n, V, h.element_size(), h.device)
    else:
        chunk = _chunk_rows(n, V, H, h.device)
    if backend == "triton":
        from ..kernels import split_loss as k

        # Inside torch.compile the registered op (traceable); eagerly the launcher itself (no op dispatch).
        fwd = k.split_loss_fwd if torch.compiler.is_compiling() else k.fused_split_fwd
        return fwd, chunk
    if backend == "torch":
        return split_loss_fwd_torch, chunk
    from .. import native

    return native.split_loss_fwd, chunk


def _side(hidden: Tensor, labels: Tensor, V: int, name: str, shift: bool, ignore_index: int):
    """Every token row of one side: (h [B·T, H], target [B·T] in [0, V), batch row [B·T] or -1 if masked).

    A target outside [0, V) that is not ``ignore_index`` is an error naming the position on CPU tensors (and on
    CUDA with ``fastsplit.set_debug(True)``); on CUDA without it, its NLL is NaN (loud, and no host sync)."""
    tgt = _targets(labels, shift, ignore_index)
    B, T = tgt.shape
    flat = tgt.reshape(-1)
    masked = flat == ignore_index
    bad = ~masked & ((flat < 0) | (flat >= V))
    if value_checks(flat) and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i // T}, {i % T + (1 if shift else 0)}] = {int(flat[i])} is outside "
                         f"[0, V={V}) and is not ignore_index={ignore_index}")
    row = torch.arange(B * T, device=flat.device) // T
    rows = torch.where(masked, torch.full_like(row, -1), row)
    safe = torch.where(masked | bad, torch.zeros_like(flat), flat)
    return hidden.reshape(-1, hidden.shape[-1]), safe, rows, bad


# --- backend="auto": measured launchers and chunk sizes -----------------------------------------------------------

def _auto_route(h: Tensor, t: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                need_dh: bool, static: str) -> tuple[str, int]:
    """(backend, chunk rows) for one launch's rows ``h`` [n, H] (both sides, or one): the tuner's memory, its disk
    cache, a measurement (every launcher that can run, each at a few chunk sizes, on a slice of the rows), else
    ``static``'s rule."""
    key = tune_key(h, weight, bias, softcap, need_dh)
    hit = _tune.TUNER.memory.get(key)
    if hit is None and torch.compiler.is_compiling():  # nothing to trace but the static rule
        return static, 0
    if hit is None:
        hit = _tune.TUNER.route(key, h.device, lambda: _candidates(h, t, weight, bias, softcap, need_dh),
                                f"{static}:chunk=0", parse=_parse_route)
    return hit


def tune_key(h: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float], need_dh: bool) -> tuple:
    """The tuner's key of one launch: the row, H and V buckets, dtype, dH or not, soft-cap, bias, device."""
    n, H = h.shape
    return ("split_loss", f"rows<={_tune.bucket(n)}", h.dtype, f"H<={_tune.bucket(H)}",
            f"V<={_tune.bucket(weight.shape[0])}", "dh" if need_dh else "no-dh", "cap" if softcap else "no-cap",
            "bias" if bias is not None else "no-bias", str(h.device))


def _parse_route(name: str) -> tuple[str, int]:
    backend, _, chunk = name.partition(":chunk=")
    try:
        return (backend if backend in ("torch", "triton", "native") else "torch"), int(chunk or 0)
    except ValueError:
        return "torch", 0


def _chunk_choices(backend: str, n: int, V: int, H: int, h: Tensor) -> list[int]:
    if backend == "triton":  # logits chunks of 32, 64 and 128 MiB (the step's extra-memory goal is 256 MiB)
        return sorted({fused_chunk_rows(n, V, h.element_size(), h.device, budget=mib << 20) for mib in (32, 64, 128)})
    base = _chunk_rows(n, V, H, h.device)
    return sorted({max(1, min(n, c)) for c in (base // 2 or 1, base, base * 2)})


def _backends(h: Tensor) -> list[str]:
    """The launchers the tuner tries on ``h``'s device. Triton runs on CUDA only here (the CPU interpreter is for
    tests, never a route); the native epilogue has a CPU build too."""
    return ["torch"] + [b for b in ("triton", "native") if (h.is_cuda or b == "native") and _refusal(b, h.device) is None]


def tuned_rows(n: int, V: int, h: Tensor, backends: Optional[list[str]] = None) -> int:
    """How many of a launch's ``n`` rows the tuner times its candidates on: the largest candidate chunk's worth (a
    launcher's time is linear in its chunks), so tuning costs about one chunk per candidate at any n."""
    backends = backends or _backends(h)
    return min(n, max(max(_chunk_choices(b, n, V, h.shape[1], h)) for b in backends))


def _candidates(h, t, weight, bias, softcap, need_dh):
    """Every launcher that can run at a few chunk sizes, on the first rows of the call (the largest chunk's worth:
    a launcher's time is linear in its chunks), checked on sampled rows against a float64 reference."""
    n, H = h.shape
    V = weight.shape[0]
    backends = _backends(h)
    choices = {b: _chunk_choices(b, n, V, H, h) for b in backends}
    rows = tuned_rows(n, V, h, backends)
    hs, ts = h[:rows], t[:rows]
    R = torch.tensor(_tune.sample_rows(rows), device=h.device)

    def runner(backend, chunk):
        fwd, _ = _launcher(backend, hs, V, chunk)
        return lambda: fwd(hs, ts, weight, bias, softcap, need_dh, chunk)

    def sample(out):
        nll, lse, dh = out
        return [nll[R], lse[R]] + ([dh[R]] if need_dh else [])

    reference = _reference_rows(hs[R], ts[R], weight, bias, softcap, need_dh)
    candidates = [_tune.Candidate(f"{b}:chunk={c}", runner(b, c), torch_path=b == "torch")
                  for b in backends for c in choices[b]]
    return candidates, _tune.Check(sample, reference)


def _refusal(backend: str, device: torch.device):
    return _backend._triton_refusal(device) if backend == "triton" else _backend._native_refusal(device)


def _reference_rows(h, t, weight, bias, softcap, need_dh, block: int = 16384) -> list[Tensor]:
    """(nll, lse[, dH]) of a few rows in float64, over the vocabulary in blocks (never the whole head in float64)."""
    h64 = h.double()
    V = weight.shape[0]
    blocks = []
    for s in range(0, V, block):
        z = h64 @ weight[s:s + block].double().t()
        if bias is not None:
            z = z + bias[s:s + block].double()
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        blocks.append(torch.logsumexp(z, dim=1))
    lse = torch.logsumexp(torch.stack(blocks, 1), dim=1)
    z_t = (h64 * weight[t].double()).sum(1) + (bias[t].double() if bias is not None else 0.0)
    if softcap:
        z_t = softcap * torch.tanh(z_t / softcap)
    out = [lse - z_t, lse]
    if need_dh:
        dh = torch.zeros_like(h64)
        for s in range(0, V, block):
            w = weight[s:s + block].double()
            raw = h64 @ w.t() + (bias[s:s + block].double() if bias is not None else 0.0)
            z = softcap * torch.tanh(raw / softcap) if softcap else raw
            g = torch.exp(z - lse[:, None])
            if softcap:
                g = g * (1 - torch.tanh(raw / softcap) ** 2)
            dh += g @ w
        w_t = weight[t].double()
        if softcap:  # the target's term of (softmax − onehot)·cap′, cap′ at the target's raw logit
            raw_t = (h64 * w_t).sum(1) + (bias[t].double() if bias is not None else 0.0)
            w_t = w_t * (1 - torch.tanh(raw_t / softcap) ** 2)[:, None]
        out.append(dh - w_t)
    return out


class SplitLossFunction(torch.autograd.Function):
    """Autograd over a split-loss launcher. Returns (loss, pos, neg, pref, hinge_active); the parts are
    detached diagnostics."""

    @staticmethod
    def forward(ctx, hidden_pos, hidden_neg, weight, bias, labels_pos, labels_neg, opts: dict):
        B, V = hidden_pos.shape[0], weight.shape[0]
        need_dh = ctx.needs_input_grad[:2]
        hp, tp, rp, bad_p = _side(hidden_pos, labels_pos, V, "labels_pos", opts["shift"], opts["ignore_index"])
        hn, tn, rn, bad_n = _side(hidden_neg, labels_neg, V, "labels_neg", opts["shift"], opts["ignore_index"])
        n_p = hp.shape[0]
        # Few rows: one launch over both sides, so the head (the bytes that bound a small pass) is read once, not
        # twice; many rows are compute-bound and run a side at a time (no [2N, H] copy of the inputs).
        merged = [(torch.cat([hp, hn]), torch.cat([tp, tn]), bool(need_dh[0] or need_dh[1]))] \
            if len(launch_rows(n_p, hn.shape[0])) == 1 else [(hp, tp, need_dh[0]), (hn, tn, need_dh[1])]
        outs = []
        for h, t, need in merged:
            backend, chunk = opts["backend"], 0
            if backend == "auto":  # measured per launch's key (rows, sizes, dtype, device): _auto_route
                backend, chunk = _auto_route(h, t, weight, bias, opts["softcap"], bool(need), opts["static"])
            fwd, chunk = _launcher(backend, h, V, chunk)
            outs.append(fwd(h, t, weight, bias, opts["softcap"], need, chunk))
        if len(outs) == 1:  # split the merged launch back into its sides (views)
            (nll, lse, dh), = outs
            outs = [(nll[:n_p], lse[:n_p], dh[:n_p] if dh.numel() else dh),
                    (nll[n_p:], lse[n_p:], dh[n_p:] if dh.numel() else dh)]
        nan = torch.full((), float("nan"), device=outs[0][0].device, dtype=outs[0][0].dtype)
        (nll_p, lse_p, dh_p), (nll_n, lse_n, dh_n) = ((torch.where(bad, nan, nll), lse, dh)
                                                      for (nll, lse, dh), bad in zip(outs, (bad_p, bad_n)))
        if value_checks(rp):
            _check_counts(rp, rn, B, opts["reduction"])
        reduce = _reduce
        if opts["backend"] == "native":
            from .. import native

            reduce = native.split_reduce
        loss, parts, coef_p, coef_n = reduce(nll_p, rp, nll_n, rn, B, opts["reduction"], opts["lambda_p"],
                                             opts["lambda_n"], opts["gamma"], opts["theta"])
        ctx.need_w, ctx.need_b = ctx.needs_input_grad[2:4]
        keep = (hp, tp, lse_p, hn, tn, lse_n) if (ctx.need_w or ctx.need_b) else ()
        ctx.save_for_backward(dh_p, coef_p, dh_n, coef_n, weight, bias, *keep)
        ctx.shapes = (hidden_pos.shape, hidden_pos.dtype, hidden_neg.shape, hidden_neg.dtype)
        ctx.softcap = opts["softcap"]
        ctx.mark_non_differentiable(*parts)
        return (loss, *parts)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dh_p, coef_p, dh_n, coef_n, weight, bias, *keep = ctx.saved_tensors
        shp_p, dt_p, shp_n, dt_n = ctx.shapes
        grads = [None] * 7
        for slot, dh, coef, shp, dt in ((0, dh_p, coef_p, shp_p, dt_p), (1, dh_n, coef_n, shp_n, dt_n)):
            if ctx.needs_input_grad[slot]:
                # where, not a product: a masked row's dH may be anything (padding), its gradient is 0.
                scaled = torch.where((coef != 0)[:, None], dh * (coef * grad_loss)[:, None], 0.0)
                grads[slot] = scaled.to(dt).view(shp)
        if ctx.need_w or ctx.need_b:
            hp, tp, lse_p, hn, tn, lse_n = keep
            dW = db = None
            for h, t, lse, coef in ((hp, tp, lse_p, coef_p), (hn, tn, lse_n, coef_n)):
                w_, b_ = _weight_grad_torch(h, t, weight, bias, ctx.softcap, lse, coef * grad_loss,
                                            ctx.need_w, ctx.need_b)
                dW = w_ if dW is None else (dW + w_ if w_ is not None else dW)
                db = b_ if db is None else (db + b_ if b_ is not None else db)
            grads[2] = dW.to(weight.dtype) if ctx.need_w else None
            grads[3] = db.to(bias.dtype) if ctx.need_b else None
        return tuple(grads)


class SequenceNLLFunction(torch.autograd.Function):
    """Autograd over a split-loss launcher for one side: per-sequence NLL [B] (token mean or sum). The forward forms
    dH with the NLLs (the logits never exist whole); backward scales each row of dH by its sequence's incoming
    gradient (dH is linear in it), so any function of the [B] NLLs trains through the fused pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: dict):
        B, V = hidden.shape[0], weight.shape[0]
        need = ctx.needs_input_grad[0]
        h, t, rows, bad = _side(hidden, labels, V, "labels", opts["shift"], opts["ignore_index"])
        backend, chunk = opts["backend"], 0
        if backend == "auto":
            backend, chunk = _auto_route(h, t, weight, bias, opts["softcap"], bool(need), opts["static"])
        fwd, chunk = _launcher(backend, h, V, chunk)
        nll, lse, dh = fwd(h, t, weight, bias, opts["softcap"], need, chunk)
        nll = torch.where(bad, torch.full((), float("nan"), device=nll.device, dtype=nll.dtype), nll)
        valid = rows >= 0
        idx = rows.clamp(min=0)
        dt = nll.dtype
        zero = torch.zeros((), device=nll.device, dtype=dt)
        total = torch.zeros(B, device=nll.device, dtype=dt).index_add_(0, idx, torch.where(valid, nll, zero))
        count = torch.zeros(B, device=nll.device, dtype=dt).index_add_(0, idx, valid.to(dt))
        if value_checks(rows) and bool((count == 0).any()):
            r = int((count == 0).nonzero()[0, 0])
            raise ValueError(f"row {r} of labels has no unmasked target token")
        per_token = count if opts["reduction"] == "mean" else torch.ones_like(count)
        ctx.need_w, ctx.need_b = ctx.needs_input_grad[1:3]
        keep = (h, t, lse) if (ctx.need_w or ctx.need_b) else ()
        ctx.save_for_backward(dh, rows, per_token, weight, bias, *keep)
        ctx.shape, ctx.dtype, ctx.softcap = hidden.shape, hidden.dtype, opts["softcap"]
        return total / per_token

    @staticmethod
    def backward(ctx, grad_out):
        dh, rows, per_token, weight, bias, *keep = ctx.saved_tensors
        valid = rows >= 0
        coef = torch.where(valid, (grad_out / per_token)[rows.clamp(min=0)], torch.zeros((), device=rows.device,
                                                                                          dtype=per_token.dtype))
        grads = [None] * 5
        if ctx.needs_input_grad[0]:
            grads[0] = torch.where(valid[:, None], dh * coef[:, None].to(dh.dtype), 0.0).to(ctx.dtype).view(ctx.shape)
        if ctx.need_w or ctx.need_b:
            h, t, lse = keep
            dW, db = _weight_grad_torch(h, t, weight, bias, ctx.softcap, lse, coef, ctx.need_w, ctx.need_b)
            grads[1] = dW.to(weight.dtype) if ctx.need_w else None
            grads[2] = db.to(bias.dtype) if ctx.need_b else None
        return tuple(grads)


def sequence_nll(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *, reduction: str = "mean",
                 ignore_index: int = -100, shift: bool = True, lm_head_bias: Optional[Tensor] = None,
                 logit_softcap: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Per-sequence NLL of ``labels`` under ``hidden`` [B, T, H] and an lm_head [V, H], through the fused SPLIT
    pass (no [tokens × V] logits in memory): [B] token means (``reduction="mean"``) or sums ("sum").

    Differentiable in ``hidden`` (and a trainable head), so any objective of per-sequence likelihoods (RePS's
    length-normalised preference terms, DPO-style margins) trains through it. ``labels`` follow
    :func:`split_loss` (``shift``, ``ignore_index``); every row needs a target.

    Example::

        >>> nll = sequence_nll(h, lm_head.weight, labels)          # [B]
        >>> torch.nn.functional.softplus(nll - 1.0).mean().backward()
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    check_tensor("hidden", hidden, ndim=3)
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got dtype {hidden.dtype}")
    check_tensor("lm_head_weight", lm_head_weight, ndim=2, like=hidden)
    if lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden has size {hidden.shape[2]} but lm_head_weight has shape "
                         f"{tuple(lm_head_weight.shape)} = [V, H]")
    _check_labels("labels", labels, hidden)
    _check_head_extras(lm_head_bias, lm_head_weight, logit_softcap, hidden)
    static, chosen = _choose(backend, hidden.device)
    opts = dict(static=static, backend=chosen, reduction=reduction, ignore_index=int(ignore_index), shift=bool(shift),
                softcap=float(logit_softcap) if logit_softcap else None)
    return SequenceNLLFunction.apply(hidden, lm_head_weight, lm_head_bias, labels, opts)


def _check_counts(rows_p: Tensor, rows_n: Tensor, B: int, reduction: str) -> None:
    """Every side, and with reduction='pair' every row, has a target token (reads the rows: CPU tensors, or CUDA
    in debug mode; see ``_checks.value_checks``)."""
    for side, rows in (("positive", rows_p), ("negative", rows_n)):
        if not bool((rows >= 0).any()):
            raise ValueError(f"the {side} side has no unmasked target token in the batch")
        if reduction == "pair":
            counts = torch.bincount(rows[rows >= 0], minlength=B)
            if bool((counts == 0).any()):
                r = int((counts == 0).nonzero()[0, 0])
                raise ValueError(f"row {r} has no unmasked target token on the {side} side "
                                 "(reduction='pair' needs at least one per row and side)")


def _validate(hidden_pos, hidden_neg, weight, labels_pos, labels_neg, bias, reduction, softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("hidden_pos", hidden_pos, ndim=3)
    check_tensor("hidden_neg", hidden_neg, ndim=3, like=hidden_pos)
    if not hidden_pos.is_floating_point():
        raise TypeError(f"hidden_pos must be a floating tensor, got dtype {hidden_pos.dtype}")
    check_tensor("lm_head_weight", weight, ndim=2, like=hidden_pos)
    B, _, H = hidden_pos.shape
    if hidden_neg.shape[0] != B:
        raise ValueError(f"hidden_pos has batch {B} (shape {tuple(hidden_pos.shape)}) but hidden_neg has "
                         f"batch {hidden_neg.shape[0]} (shape {tuple(hidden_neg.shape)})")
    if hidden_neg.shape[2] != H or weight.shape[1] != H:
        raise ValueError(f"hidden sizes differ: hidden_pos {tuple(hidden_pos.shape)}, hidden_neg "
                         f"{tuple(hidden_neg.shape)}, lm_head_weight {tuple(weight.shape)} = [V, H]")
    for name, lab, hid in (("labels_pos", labels_pos, hidden_pos), ("labels_neg", labels_neg, hidden_neg)):
        _check_labels(name, lab, hid)
    _check_head_extras(bias, weight, softcap, hidden_pos)


def _check_labels(name: str, lab, hid: Tensor) -> None:
    check_tensor(name, lab, shape=hid.shape[:2])
    if lab.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor, got dtype {lab.dtype}")
    if lab.device != hid.device:
        raise ValueError(f"{name} is on {lab.device} but the hidden states are on {hid.device}")


def _check_head_extras(bias, weight: Tensor, softcap, like: Tensor) -> None:
    if bias is not None:
        check_tensor("lm_head_bias", bias, shape=(weight.shape[0],), like=like)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logit_softcap must be positive, got {softcap}")


def _choose(backend: str, device: torch.device) -> tuple[str, str]:
    """(the static backend, the backend the launch asks for): "auto" where the tuner may measure on this device
    (each launch's launcher and chunk size are then measured, or read from its cache)."""
    static = _backend.resolve(backend, device, op="split_loss")
    return static, ("auto" if backend == "auto" and _env.tuning(device.type) else static)


def split_loss(hidden_pos: Tensor, hidden_neg: Tensor, lm_head_weight: Tensor, labels_pos: Tensor,
               labels_neg: Tensor, *, lambda_p: float = 1.0, lambda_n: float = 0.5, gamma: float = 5.0,
               theta: float = 0.4, reduction: str = "batch", ignore_index: int = -100, shift: bool = True,
               lm_head_bias: Optional[Tensor] = None, logit_softcap: Optional[float] = None,
               return_parts: bool = False, backend: str = "auto"):
    """SPLIT loss ``λp·L_pos + λn·L_neg + γ·ReLU(θ − (L_neg − L_pos))``, never materialising the logits.

    Shapes: ``hidden_pos`` [B, Tp, H] and ``hidden_neg`` [B, Tn, H] (final hidden states, after the final
    norm; Tp and Tn may differ), ``lm_head_weight`` [V, H], ``labels_*`` [B, T*] in the Hugging Face
    convention (with ``shift=True`` hidden[:, t] predicts labels[:, t+1]; ``ignore_index`` masks prompt
    and padding). ``logit_softcap`` c applies c·tanh(z/c) to the logits (Gemma-2).

    ``reduction="batch"``: L_pos / L_neg are token means pooled over the batch and the hinge acts on them.
    ``reduction="pair"``: each example has its own means, hinge and loss; the loss is their mean.

    Returns the scalar loss, or ``(loss, parts)`` with ``return_parts=True``: ``parts`` holds "pos",
    "neg", "pref_log_odds" (= neg − pos) and "hinge_active" (scalars for "batch", [B] for "pair"),
    detached. Gradients reach both hidden tensors, and the lm_head weight/bias only if they require grad.

    Example::

        >>> H, V = 16, 50
        >>> W = torch.randn(V, H)
        >>> hp, hn = torch.randn(2, 6, H, requires_grad=True), torch.randn(2, 4, H, requires_grad=True)
        >>> lp, ln = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 4))
        >>> lp[:, :3] = -100                      # mask the prompt
        >>> loss, parts = split_loss(hp, hn, W, lp, ln, return_parts=True)
        >>> loss.backward()
    """
    _validate(hidden_pos, hidden_neg, lm_head_weight, labels_pos, labels_neg, lm_head_bias, reduction,
              logit_softcap)
    static, chosen = _choose(backend, hidden_pos.device)
    opts = dict(static=static, lambda_p=float(lambda_p), lambda_n=float(lambda_n), gamma=float(gamma), theta=float(theta),
                reduction=reduction, ignore_index=int(ignore_index), shift=bool(shift),
                softcap=float(logit_softcap) if logit_softcap else None, backend=chosen)
    loss, pos, neg, pref, active = SplitLossFunction.apply(hidden_pos, hidden_neg, lm_head_weight, lm_head_bias,
                                                           labels_pos, labels_neg, opts)
    if not return_parts:
        return loss
    return loss, {"pos": pos, "neg": neg, "pref_log_odds": pref, "hinge_active": active}

"""Triton kernels for the SPLIT loss: per-token NLL and the unscaled dH, one chunk of tokens at a time.

Per chunk of C unmasked token rows (C·V·4 bytes of workspace, the one tile the op holds):

* ``_split_loss_fwd_kernel`` (grid: row tiles × vocab tiles): z = softcap(h·Wᵀ + b) for its tile,
  stored to the fp32 workspace, plus the tile's row max and Σexp (online log-sum-exp partials)
  and the target logit when the target falls in the tile. 2·C·H·V FLOPs.
* partials → lse and NLL (a few [C, V/BLOCK_V] torch ops).
* ``_split_loss_bwd_kernel`` (grid: row tiles × hidden tiles): dH = ((softmax − onehot)⊙cap′)·W,
  the softmax formed on the fly from the stored logits as each tile is loaded. 2·C·H·V FLOPs.

So forward + dH is 4·T·H·V FLOPs, the logits are computed once, and the full [T × V] logits never
exist. The per-row hinge coefficient is applied later by the op (dH is linear in it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops._backend import triton_interpreting

_INTERPRET = triton_interpreting()
_CHUNK_BYTES = (8 << 20) if _INTERPRET else (512 << 20)


def _configs(names, table):
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    if _INTERPRET:
        return [triton.Config(keep(dict(zip(names, (64, 64, 64)))))]
    return [triton.Config(keep(dict(zip(names, t[:3]))), num_warps=t[3], num_stages=t[4]) for t in table]


# BLOCK_V is fixed, not tuned: it sets how many log-sum-exp partials each row has.
_FWD_BLOCK_V = 64 if _INTERPRET else 128


@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_K", "_unused"),
                                  [(128, 64, 0, 8, 3), (128, 64, 0, 4, 4), (64, 64, 0, 4, 4),
                                   (128, 128, 0, 8, 3), (64, 128, 0, 4, 3)]),
                 key=["C_BUCKET", "V", "H"])
@triton.jit
def _split_loss_fwd_kernel(
    Hid, W, BIAS, TGT, Z, PMAX, PSUM, ZT,
    C, V, H, NVT,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_zm, stride_zv,
    softcap,
    C_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < C
    mask_v = offs_v < V
    h_ptrs = Hid + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_v[None, :] * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mask_k = offs_k < H - k0
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision="ieee" if IEEE else None)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        # c·tanh(z/c), with tanh from exp: tl has no portable tanh across Triton 3.6–3.9.
        e = tl.exp(-2.0 * tl.abs(acc / softcap))
        acc = softcap * tl.where(acc >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    tl.store(Z + offs_m[:, None] * stride_zm + offs_v[None, :] * stride_zv, acc,
             mask=mask_m[:, None] & mask_v[None, :])
    # Online log-sum-exp partials of this vocab tile; the columns past V count as -inf.
    zm = tl.where(mask_v[None, :], acc, float("-inf"))
    tile_max = tl.max(zm, axis=1)
    tile_sum = tl.sum(tl.exp(zm - tile_max[:, None]), axis=1)
    tl.store(PMAX + offs_m * NVT + pid_v, tile_max, mask=mask_m)
    tl.store(PSUM + offs_m * NVT + pid_v, tile_sum, mask=mask_m)
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
    hit = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]
    zt = tl.sum(tl.where(hit, acc, 0.0), axis=1)
    in_tile = (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V)
    tl.store(ZT + offs_m, zt, mask=mask_m & in_tile)


@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_K", "BLOCK_V"),
                                  [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3),
                                   (128, 64, 64, 4, 4), (64, 64, 128, 4, 4)]),
                 key=["C_BUCKET", "V", "H"])
@triton.jit
def _split_loss_bwd_kernel(
    Z, LSE, TGT, W, DH,
    C, V, H,
    stride_zm, stride_zv, stride_wv, stride_wk, stride_dm, stride_dk,
    inv_softcap,
    C_BUCKET: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask_m = offs_m < C
    mask_k = offs_k < H
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
    z_ptrs = Z + offs_m[:, None] * stride_zm + offs_v[None, :] * stride_zv
    w_ptrs = W + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask_v = offs_v < V - v0
        z = tl.load(z_ptrs, mask=mask_m[:, None] & mask_v[None, :], other=0.0)  # masked lanes zeroed below
        g = tl.exp(z - lse[:, None])  # softmax from the stored logits: no second logits GEMM
        g = g - tl.where(offs_v[None, :] + v0 == tgt[:, None], 1.0, 0.0)
        if SOFTCAP:
            t = z * inv_softcap
            g = g * (1.0 - t * t)  # d(c·tanh(x/c))/dx from the capped value
        g = tl.where(mask_m[:, None] & mask_v[None, :], g, 0.0)
        w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision="ieee" if IEEE else None)
        z_ptrs += BLOCK_V * stride_zv
        w_ptrs += BLOCK_V * stride_wv
    tl.store(DH + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk, acc,
             mask=mask_m[:, None] & mask_k[None, :])


def _bucket(c: int) -> int:
    return min(triton.next_power_of_2(max(c, 1)), 4096)


@triton_op("fastsplit::split_loss_fwd", mutates_args={})
def split_loss_fwd(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                   need_dh: bool, chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher. ``h`` [N, H] unmasked rows, ``tgt`` [N] in [0, V), ``weight`` [V, H].

    Returns (nll [N], lse [N], dH [N, H] or empty), fp32. ``chunk_rows`` bounds the workspace
    (0: as many rows as fit in the chunk budget).
    """
    N, H = h.shape
    V = weight.shape[0]
    chunk = chunk_rows or max(16, _CHUNK_BYTES // (4 * V))
    chunk = min(chunk, max(N, 1))
    dev = h.device
    nll = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    dh = torch.empty((N, H) if need_dh else (0,), device=dev, dtype=torch.float32)
    z = torch.empty((chunk, V), device=dev, dtype=torch.float32)
    nvt = triton.cdiv(V, _FWD_BLOCK_V)
    ieee = h.dtype == torch.float32
    tgt32 = tgt.to(torch.int32)
    for s in range(0, N, chunk):
        c = min(chunk, N - s)
        hs, ts = h[s:s + c], tgt32[s:s + c]
        pmax = torch.empty((c, nvt), device=dev, dtype=torch.float32)
        psum = torch.empty((c, nvt), device=dev, dtype=torch.float32)
        zt = torch.empty(c, device=dev, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), nvt)
        wrap_triton(_split_loss_fwd_kernel)[grid](
            hs, weight, bias if bias is not None else weight, ts, z, pmax, psum, zt,
            c, V, H, nvt,
            hs.stride(0), hs.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
            float(softcap or 1.0),
            C_BUCKET=_bucket(c), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, IEEE=ieee,
            BLOCK_V=_FWD_BLOCK_V,
        )
        top = pmax.max(dim=1).values
        row_lse = top + torch.log((psum * torch.exp(pmax - top[:, None])).sum(dim=1))
        lse[s:s + c] = row_lse
        nll[s:s + c] = row_lse - zt
        if need_dh:
            out = dh[s:s + c]
            grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), triton.cdiv(H, meta["BLOCK_K"]))
            wrap_triton(_split_loss_bwd_kernel)[grid](
                z, lse[s:s + c], ts, weight, out, c, V, H,
                z.stride(0), z.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                1.0 / float(softcap or 1.0),
                C_BUCKET=_bucket(c), SOFTCAP=softcap is not None, IEEE=ieee,
            )
    return nll, lse, dh

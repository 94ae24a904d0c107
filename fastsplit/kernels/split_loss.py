"""Triton kernels for the SPLIT loss: per-token NLL and the unscaled dH, one chunk of tokens at a time.

Per chunk of C token rows (C·V·4 bytes of workspace, the one tile the op holds; the op derives C from
the device and the problem, ``fastsplit.ops._chunks``):

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
from torch.library import triton_op

from .._env import triton_interpreting
from ._common import bucket, elem_bytes, launch, pruner, use_fixed

_INTERPRET = triton_interpreting()

# BLOCK_V is fixed, not tuned: it sets how many log-sum-exp partials each row has.
GPU_BLOCK_V = 128
_FWD_BLOCK_V = 64 if _INTERPRET else GPU_BLOCK_V
# Row tile of both kernels' largest config: the op sizes its chunks in multiples of it.
BLOCK_M_MAX = 128


def _configs(names, table, *, interpret=None):
    if _INTERPRET if interpret is None else interpret:
        return [triton.Config(dict(zip(names, (64, 64, 64))))]
    return [triton.Config(dict(zip(names, t[:len(names)])), num_warps=t[-2], num_stages=t[-1]) for t in table]


# (block sizes..., warps, stages): the autotune spaces on a GPU, pruned per launch by shared memory.
FWD_NAMES, FWD_TABLE = ("BLOCK_M", "BLOCK_K"), [(128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3),
                                                (64, 128, 4, 3), (64, 64, 4, 2)]
BWD_NAMES, BWD_TABLE = ("BLOCK_M", "BLOCK_K", "BLOCK_V"), [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                                           (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                                                           (64, 64, 128, 4, 4), (64, 64, 64, 4, 2)]


def fwd_footprint(es: int, block_v: int = _FWD_BLOCK_V):
    """Logits kernel: pipelined h [BM, BK] and W [BK, BV] tiles."""
    return lambda c: c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * block_v) * es


def bwd_footprint(es: int):
    """dH kernel: pipelined fp32 logits [BM, BV] and W [BV, BK] tiles, plus the softmax tile as a dot operand."""
    return lambda c: (c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_V"] * 4 + c["BLOCK_V"] * c["BLOCK_K"] * es)
                      + c["BLOCK_M"] * c["BLOCK_V"] * es)


FIXED_FWD = triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2)
FIXED_BWD = triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_V": 64}, num_warps=4, num_stages=2)


@triton.autotune(configs=_configs(FWD_NAMES, FWD_TABLE),
                 key=["C_BUCKET", "V", "H"], prune_configs_by=pruner(lambda n, kw: fwd_footprint(elem_bytes(n["Hid"]))))
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


@triton.autotune(configs=_configs(BWD_NAMES, BWD_TABLE),
                 key=["C_BUCKET", "V", "H"], prune_configs_by=pruner(lambda n, kw: bwd_footprint(elem_bytes(n["W"]))))
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


@triton_op("fastsplit::split_loss_fwd", mutates_args={})
def split_loss_fwd(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                   need_dh: bool, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher. ``h`` [N, H] rows, ``tgt`` [N] in [0, V), ``weight`` [V, H].

    Returns (nll [N], lse [N], dH [N, H] or empty), fp32, holding one [chunk_rows, V] fp32 logits
    workspace (the op sizes it with ``fastsplit.ops._chunks.chunk_rows``).
    """
    N, H = h.shape
    V = weight.shape[0]
    chunk = max(1, min(chunk_rows, N))
    dev = h.device
    nll = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    dh = torch.empty((N, H) if need_dh else (0,), device=dev, dtype=torch.float32)
    z = torch.empty((chunk, V), device=dev, dtype=torch.float32)
    nvt = triton.cdiv(V, _FWD_BLOCK_V)
    ieee = h.dtype == torch.float32
    tgt32 = tgt.to(torch.int32)
    fixed = use_fixed()
    for s in range(0, N, chunk):
        c = min(chunk, N - s)
        hs, ts = h[s:s + c], tgt32[s:s + c]
        pmax = torch.empty((c, nvt), device=dev, dtype=torch.float32)
        psum = torch.empty((c, nvt), device=dev, dtype=torch.float32)
        zt = torch.empty(c, device=dev, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), nvt)
        launch(_split_loss_fwd_kernel, grid,
               (hs, weight, bias if bias is not None else weight, ts, z, pmax, psum, zt, c, V, H, nvt,
                hs.stride(0), hs.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
                float(softcap or 1.0)),
               dict(C_BUCKET=bucket(c), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, IEEE=ieee,
                    BLOCK_V=_FWD_BLOCK_V), FIXED_FWD if fixed else None)
        top = pmax.max(dim=1).values
        row_lse = top + torch.log((psum * torch.exp(pmax - top[:, None])).sum(dim=1))
        lse[s:s + c] = row_lse
        nll[s:s + c] = row_lse - zt
        if need_dh:
            out = dh[s:s + c]
            grid = lambda meta: (triton.cdiv(c, meta["BLOCK_M"]), triton.cdiv(H, meta["BLOCK_K"]))
            launch(_split_loss_bwd_kernel, grid,
                   (z, lse[s:s + c], ts, weight, out, c, V, H,
                    z.stride(0), z.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                    1.0 / float(softcap or 1.0)),
                   dict(C_BUCKET=bucket(c), SOFTCAP=softcap is not None, IEEE=ieee), FIXED_BWD if fixed else None)
    return nll, lse, dh

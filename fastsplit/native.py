"""The optional compiled extension (csrc/) as ``backend="native"``: loader, launchers, torch.library ops.

The extension is optional: when it is missing the package works on its torch and Triton paths, and this
module says so once, at import, through the ``fastsplit`` logger. Launchers pass data pointers, shapes,
strides and the current stream; the kernels are the CUDA ones for CUDA tensors and the CPU build of the
same bodies for CPU tensors (float32; other dtypes are computed in float32 there).

Op: ``fastsplit::split_loss_native_fwd`` (cuBLAS/torch GEMM chunks + the CUDA epilogue), registered with
``custom_op`` + ``register_fake``. steered_linear has no native kernel: its decode kernel is Triton's.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("fastsplit")

_C = None
_IMPORT_ERROR: str | None = None
if importlib.util.find_spec("fastsplit._C") is None:
    _IMPORT_ERROR = "it was not built"
else:
    try:
        _C = importlib.import_module("fastsplit._C")
    except Exception as exc:  # pragma: no cover - depends on the build
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
if _C is None:
    log.warning("fastsplit: the compiled extension fastsplit._C is not available (%s); "
                "backend='native' is off, the torch and Triton paths work.", _IMPORT_ERROR)
elif not _C.cuda_built() and os.environ.get("FASTSPLIT_QUIET_NATIVE") != "1":
    log.warning("fastsplit: the extension was built without nvcc: its CUDA kernels are absent "
                "(backend='native' runs on CPU tensors only).")

_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


def cuda_archs() -> list[str]:
    return list(_C.cuda_archs()) if _C is not None else []


def refusal(device: torch.device) -> str | None:
    """Why backend='native' cannot run on ``device``, or None when it can."""
    if _C is None:
        return f"the compiled extension fastsplit._C did not import ({_IMPORT_ERROR})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if cuda_built() else "the extension was built without nvcc (no CUDA kernels)"
    return f"the extension has no kernels for device type {device.type!r}"


def _p(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _rows(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    """Row-contiguous (last stride 1) in the kernel's dtype."""
    if t is None:
        return None
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_cuda else torch.float32  # the CPU build takes float32


@torch.library.custom_op("fastsplit::split_loss_native_fwd", mutates_args=())
def split_loss_fwd(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                   need_dh: bool, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Native SPLIT launcher: logits chunks from torch.matmul (cuBLAS on a GPU), the epilogue in the extension.
    Same contract as the torch and Triton launchers: (nll [N], lse [N], dH [N, H] or empty), fp32, holding
    one [chunk_rows, V] logits block."""
    N, H = h.shape
    V = weight.shape[0]
    kd = _kernel_dtype(h)
    w = weight.to(kd)
    chunk = max(1, min(N, chunk_rows))
    dev, f32 = h.device, torch.float32
    nll = torch.empty(N, device=dev, dtype=f32)
    lse = torch.empty(N, device=dev, dtype=f32)
    dh = torch.empty((N, H) if need_dh else (0,), device=dev, dtype=f32)
    tgt = tgt.to(torch.int64).contiguous()
    cap = float(softcap) if softcap else 0.0
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        z = h[s:e].to(kd) @ w.t()  # [c, V] logits of this chunk only
        if bias is not None:
            z += bias.to(kd)
        run_max = torch.full((e - s,), float("-inf"), device=dev, dtype=f32)
        run_sum = torch.zeros(e - s, device=dev, dtype=f32)
        z_t = torch.empty(e - s, device=dev, dtype=f32)
        _C.split_lse(h.is_cuda, _CODES[kd], _p(z), z.stride(0), e - s, V, _p(tgt[s:e]), cap, _p(run_max),
                     _p(run_sum), _p(z_t), _stream(h))
        lse[s:e] = run_max + run_sum.log()
        nll[s:e] = lse[s:e] - z_t
        if need_dh:
            _C.split_grad(h.is_cuda, _CODES[kd], _p(z), z.stride(0), e - s, V, _p(tgt[s:e]), cap,
                          _p(lse[s:e]), _stream(h))
            dh[s:e] = (z @ w).float()  # dlogits were written in place over the logits
    return nll, lse, dh


@split_loss_fwd.register_fake
def _(h, tgt, weight, bias, softcap, need_dh, chunk_rows):
    n = h.shape[0]
    f = dict(device=h.device, dtype=torch.float32)
    return (torch.empty(n, **f), torch.empty(n, **f),
            torch.empty((n, h.shape[1]) if need_dh else (0,), **f))


def split_reduce(nll_p: Tensor, rows_p: Tensor, nll_n: Tensor, rows_n: Tensor, B: int, reduction: str,
                 lp: float, ln: float, gamma: float, theta: float):
    """Native row reductions and hinge coefficients; same contract as ``ops.split_loss._reduce``: ``rows_*``
    [n] hold each token's batch row, or -1 for a masked token (not counted; coefficient 0)."""
    pair = reduction == "pair"
    nb = B if pair else 1
    dev, f32 = nll_p.device, torch.float32
    nll_p, nll_n = nll_p.to(f32).contiguous(), nll_n.to(f32).contiguous()
    rows_p, rows_n = rows_p.to(torch.int64).contiguous(), rows_n.to(torch.int64).contiguous()
    sums = torch.zeros(4 * nb, device=dev, dtype=f32)
    pos, neg = torch.empty(nb, device=dev, dtype=f32), torch.empty(nb, device=dev, dtype=f32)
    active = torch.empty(nb, device=dev, dtype=torch.uint8)
    coef_p, coef_n = torch.empty_like(nll_p), torch.empty_like(nll_n)
    loss = torch.empty(1, device=dev, dtype=f32)
    _C.split_reduce(nll_p.is_cuda, _p(nll_p), _p(rows_p), nll_p.numel(), _p(nll_n), _p(rows_n), nll_n.numel(), B,
                    pair, lp, ln, gamma, theta, _p(sums), _p(pos), _p(neg), _p(active), _p(coef_p), _p(coef_n),
                    _p(loss), _stream(nll_p))
    squeeze = (lambda t: t) if pair else (lambda t: t[0])
    return loss[0], (squeeze(pos), squeeze(neg), squeeze(neg - pos), squeeze(active.bool())), coef_p, coef_n

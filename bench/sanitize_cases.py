"""A small, odd-shaped case of every kernel for compute-sanitizer: every form, m kind and dtype of the Triton
steered-linear kernels (forward and backward), the Triton SPLIT kernels, and the native decode and SPLIT
kernels; then every autotune config that fits the device, once each, on the LoRA and per-row local_weight
cases (an out-of-bounds read hid in one config before). Outputs are NaN-poisoned and checked finite.

Run under the sanitizer (bench/gpu_check.sh does):
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cases.py
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("FASTSPLIT_FIXED_CONFIGS", "1")  # one launch per case; the config sweep is explicit below

import torch  # noqa: E402

import fastsplit  # noqa: E402
from fastsplit import native  # noqa: E402
from fastsplit.kernels import _common  # noqa: E402
from fastsplit.kernels import steered_linear as kst  # noqa: E402

DEV = "cuda"
IN, OUT, R, V, H = 123, 77, 3, 4099, 40
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_empty = torch.empty


def poisoned(*a, **k):
    t = _empty(*a, **k)
    return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t


torch.empty = poisoned  # an unwritten output element shows as NaN


def finite(name, *ts):
    for t in ts:
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            sys.exit(f"{name}: non-finite output (an unwritten element?)")


def steered(form, mkind, dtype, backend, rows=5):
    g = lambda *s, scale=1.0: (torch.randn(*s, device=DEV) * scale).to(dtype)
    x = g(2, rows, IN).requires_grad_()  # [B, T, in]
    kw = {"delta_bias": g(OUT).requires_grad_()}
    if form == "lora":
        kw["lora_a"], kw["lora_b"] = g(R, IN, scale=0.1).requires_grad_(), g(OUT, R).requires_grad_()
    elif form == "local_weight":
        kw["delta_weight"] = g(OUT, IN, scale=0.1).requires_grad_()
    m = {"scalar": 1.5, "per_row": torch.randn(2, device=DEV), "per_token": torch.randn(2, rows, device=DEV)}[mkind]
    y = fastsplit.steered_linear(x, g(OUT, IN, scale=0.1).requires_grad_(), g(OUT).requires_grad_(), m1=m,
                                 backend=backend, **kw)
    if backend == "native":  # a forward (decode) kernel
        finite(f"native {form} {mkind} {dtype}", y)
        return
    y.backward(torch.randn_like(y))
    finite(f"{backend} {form} {mkind} {dtype}", y, x.grad, *(t.grad for t in kw.values()))


def split(dtype, backend, softcap=None):
    hp = (torch.randn(2, 9, H, device=DEV)).to(dtype).requires_grad_()
    hn = (torch.randn(2, 6, H, device=DEV)).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=DEV) * 0.3).to(dtype)
    lp, ln = torch.randint(0, V, (2, 9), device=DEV), torch.randint(0, V, (2, 6), device=DEV)
    lp[:, :3] = -100
    loss = fastsplit.split_loss(hp, hn, w, lp, ln, logit_softcap=softcap, reduction="pair", backend=backend)
    loss.backward()
    finite(f"split {backend} {dtype} cap={softcap}", loss, hp.grad, hn.grad)


def main() -> int:
    n = 0
    for dtype in DTYPES:
        for form in ("vector", "lora", "local_weight"):
            for mkind in ("scalar", "per_row", "per_token"):
                steered(form, mkind, dtype, "triton")
                n += 1
                if native.cuda_built() and dtype != torch.float16:
                    steered(form, mkind, dtype, "native", rows=33)
                    n += 1
        for backend in ["triton"] + (["native"] if native.cuda_built() else []):
            for cap in (None, 30.0):
                split(dtype, backend, cap)
                n += 1
    budget = _common.smem_budget(torch.cuda.current_device())
    for form, es in (("lora", 2), ("local_weight", 2)):
        fp = kst.fwd_footprint(es, has_dw=form == "local_weight", has_lora=form == "lora", block_r=16)
        for cfg in _common.fits(kst.gpu_fwd_configs(), fp, budget):
            kst.FIXED_FWD = {"decode": cfg, "prefill": cfg}
            for rows in (5, 130):
                steered(form, "per_row", torch.float16, "triton", rows=rows)
                n += 1
    torch.cuda.synchronize()
    print(f"sanitize_cases: {n} cases ran, every output finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())

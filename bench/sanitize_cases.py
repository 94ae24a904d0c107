"""One small, odd-shaped launch of every Triton and native kernel, for compute-sanitizer memcheck (goal: under 60 s).

Kernels and their variants, each once per dtype (fp32, fp16, bf16):
  Triton _steered_linear_fwd_kernel     vector / LoRA (r=3) / local_weight folded (scalar m) / local_weight per-row m,
                                        unsplit (K=123) and K-split into partial planes (K=600)
  Triton _steered_linear_reduce_kernel  the split's partial sum and epilogue (with the K=600 cases)
  Triton _split_fused_kernel            V=4099, with and without soft-capping, with and without the gradient
  native split_lse / split_grad / split_reduce (the CUDA epilogue), when the extension has CUDA kernels
then every autotune config of the decode kernel that fits this device's shared memory, once at the smallest shape.
Outputs are NaN-poisoned and checked finite; a line per kernel says where a time-out stopped.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cases.py   (gpu_check.sh does)
    python bench/sanitize_cases.py --device cpu                                          (dry run: interpreter, fp32)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("FASTSPLIT_FIXED_CONFIGS", "1")  # one launch per case; the config sweep is explicit below

_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
ARGS = _parser.parse_args()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton or fastsplit is imported

import torch  # noqa: E402

import fastsplit  # noqa: E402
from fastsplit import native  # noqa: E402
from fastsplit.kernels import _common  # noqa: E402
from fastsplit.kernels import steered_linear as kst  # noqa: E402

DEV = ARGS.device
IN, OUT, R, V, H = 123, 77, 3, 4099, 40
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float32]
_empty = torch.empty
T0 = time.time()


def poisoned(*a, **k):
    t = _empty(*a, **k)
    return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t


torch.empty = poisoned  # an unwritten output element shows as NaN


def say(what: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {what}", flush=True)


def finite(name, *ts):
    for t in ts:
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            sys.exit(f"{name}: non-finite output (an unwritten element?)")


def steered(form, mkind, dtype, k=IN, rows=5):
    g = lambda *s, scale=1.0: (torch.randn(*s, device=DEV) * scale).to(dtype)
    x = g(rows, k)
    kw = {"delta_bias": g(OUT)}
    if form == "lora":
        kw["lora_a"], kw["lora_b"] = g(R, k, scale=0.1), g(OUT, R)
    elif form == "local_weight":
        kw["delta_weight"] = g(OUT, k, scale=0.1)
    m = 1.5 if mkind == "scalar" else torch.randn(rows, device=DEV)
    y = fastsplit.steered_linear(x, g(OUT, k, scale=0.1), g(OUT), m1=m, backend="triton", **kw)
    finite(f"steered {form} {mkind} {dtype} K={k}", y)


def split(dtype, backend, softcap, grad):
    hp = torch.randn(2, 9, H, device=DEV).to(dtype).requires_grad_(grad)
    hn = torch.randn(2, 6, H, device=DEV).to(dtype).requires_grad_(grad)
    w = (torch.randn(V, H, device=DEV) * 0.3).to(dtype)
    lp, ln = torch.randint(0, V, (2, 9), device=DEV), torch.randint(0, V, (2, 6), device=DEV)
    lp[:, :3] = -100
    loss = fastsplit.split_loss(hp, hn, w, lp, ln, logit_softcap=softcap, reduction="pair", backend=backend)
    finite(f"split {backend} {dtype} cap={softcap}", loss)
    if grad:
        loss.backward()
        finite(f"split {backend} {dtype} cap={softcap} grads", hp.grad, hn.grad)


def main() -> int:
    n = 0
    for dtype in DTYPES:
        for form, mkind in (("vector", "per_row"), ("lora", "scalar"), ("lora", "per_row"),
                            ("local_weight", "scalar"), ("local_weight", "per_row")):
            for k in (IN, 600):  # unsplit; split into partial planes + the reduce kernel
                steered(form, mkind, dtype, k=k)
                n += 1
        say(f"_steered_linear_fwd_kernel + _steered_linear_reduce_kernel: {dtype} done")
        for softcap in (None, 30.0):
            for grad in (True, False):
                split(dtype, "triton", softcap, grad)
                n += 1
        say(f"_split_fused_kernel: {dtype} done")
        if DEV == "cpu" or native.cuda_built():
            if DEV == "cpu" and dtype != torch.float32:
                continue
            for softcap in (None, 30.0):
                split(dtype, "native", softcap, True)
                n += 1
            say(f"native split_lse / split_grad / split_reduce: {dtype} done")
    budget = _common.smem_budget(torch.cuda.current_device()) if DEV == "cuda" else _common.HOPPER_SMEM
    for form in ("lora", "local_weight"):
        fp = kst.footprint(2, block_m=16, block_n=kst.BLOCK_N_DECODE, has_dw=form == "local_weight",
                           has_lora=form == "lora", block_r=16)
        configs = _common.fits(kst.gpu_configs(), fp, budget)
        for cfg in configs:
            kst.FIXED = cfg
            steered(form, "per_row", torch.bfloat16 if DEV == "cuda" else torch.float32, k=600)
            n += 1
        say(f"decode-kernel autotune configs that fit {budget} B: {len(configs)} for {form}")
    if DEV == "cuda":
        torch.cuda.synchronize()
    say(f"sanitize_cases: {n} cases ran, every output finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())

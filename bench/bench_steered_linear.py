"""steered_linear against the usual steering code, torch.compile of the reference, and the bare GEMM.

Providers:
  gemm       bare x·Wᵀ (cuBLAS on GPU): the floor the fused op is measured against
  eager      the usual steering way: W + m·ΔW materialised (per row when m varies), LoRA as separate matmuls
  compile    torch.compile of fastsplit.steered_linear_ref
  fastsplit  fastsplit.steered_linear (backend="auto": Triton on GPU, the torch path on CPU)
  native     fastsplit.steered_linear(backend="native"): the csrc skinny GEMM, decode shapes only

Run: python bench/bench_steered_linear.py [--quick] [--device cuda]
"""
from __future__ import annotations

import sys
import os

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import fastsplit  # noqa: E402
from fastsplit import steered_linear, steered_linear_ref  # noqa: E402


def eager_steering(x, W, b, *, delta_weight=None, lora_a=None, lora_b=None, delta_bias=None, m1):
    """How steering is usually written: materialise the steered weight, one copy per strength."""
    if delta_weight is not None:
        if isinstance(m1, torch.Tensor):  # per-row m: one W + m·ΔW per sequence
            w_eff = W[None] + m1[:, None, None] * delta_weight[None]
            y = torch.bmm(x, w_eff.transpose(1, 2))
        else:
            y = F.linear(x, W + m1 * delta_weight)
        y = y + b
    else:
        y = F.linear(x, W, b)
        if lora_a is not None:
            m = m1[:, None, None] if isinstance(m1, torch.Tensor) else m1
            y = y + m * F.linear(F.linear(x, lora_a), lora_b)
    if delta_bias is not None:
        m = m1[:, None, None] if isinstance(m1, torch.Tensor) else m1
        y = y + m * delta_bias
    return y


def make(form, rows, seq, k, n, dtype, device, rank=16, grad=False):
    g = lambda *s, scale=1.0: (torch.randn(*s, device=device, dtype=torch.float32) * scale).to(dtype)
    x = g(rows, seq, k)
    W, b = g(n, k, scale=k ** -0.5), g(n)
    d = {"delta_bias": g(n)}
    if form == "lora":
        d["lora_a"], d["lora_b"] = g(rank, k, scale=k ** -0.5), g(n, rank)
    elif form == "local_weight":
        d["delta_weight"] = g(n, k, scale=k ** -0.5)
    if grad:
        x.requires_grad_(True)
        for t in d.values():
            t.requires_grad_(True)
    return x, W, b, d


def providers(device):
    # A fresh compiled callable per case: one shared one would hit dynamo's recompile limit and fall
    # back to eager without saying so in the figures.
    comp = torch.compile(lambda *a, **k: steered_linear_ref(*a, **k), dynamic=False)
    return {
        "gemm": lambda x, W, b, d, m: F.linear(x, W),
        "eager": lambda x, W, b, d, m: eager_steering(x, W, b, **d, m1=m),
        "compile": lambda x, W, b, d, m: comp(x, W, b, **d, m1=m),
        "fastsplit": lambda x, W, b, d, m: steered_linear(x, W, b, **d, m1=m),
        "native": lambda x, W, b, d, m: steered_linear(x, W, b, **d, m1=m, backend="native"),
    }


def main():
    p = harness.arg_parser(__doc__)
    args = p.parse_args()
    dev = args.device
    if dev == "cuda":
        dtype = torch.bfloat16
        shapes = [("prefill", 8, 512, 3584, 18944), ("prefill", 8, 512, 18944, 3584)]
        shapes += [("decode", r, 1, k, n) for r in (1, 4, 16, 64)
                   for k, n in ((3584, 18944), (18944, 3584), (4096, 4096))]
    else:
        dtype = torch.float32
        shapes = [("prefill", 4, 64, 576, 1536)] if args.quick else [("prefill", 8, 128, 576, 1536),
                                                                     ("decode", 16, 1, 1536, 576)]
    rows = []
    for form in ["vector", "lora", "local_weight"]:
        for mkind in ["scalar", "per_row"]:
            for tag, r, t, k, n in shapes:
                provs = providers(dev)
                x, W, b, d = make(form, r, t, k, n, dtype, dev)
                m = 1.5 if mkind == "scalar" else torch.linspace(-2, 2, r, device=dev)
                xv = f"{tag}:{r * t}x{k}->{n}"
                for name, fn in provs.items():
                    if name == "native" and (tag != "decode" or not fastsplit.build_info()["native_cpu"]):
                        continue
                    with torch.no_grad():
                        rows.append(harness.time_row(f"steered_linear[{form},{mkind}]", name, "fwd",
                                                     "shape", xv, lambda: fn(x, W, b, d, m),
                                                     device=dev, rep=args.rep))
                xg, W, b, dg = make(form, r, t, k, n, dtype, dev, grad=True)
                for name in ("eager", "compile", "fastsplit"):
                    fn = provs[name]

                    def full():
                        y = fn(xg, W, b, dg, m)
                        y.backward(torch.ones_like(y))
                    rows.append(harness.time_row(f"steered_linear[{form},{mkind}]", name, "full", "shape", xv,
                                                 full, device=dev, rep=args.rep))
    harness.print_rows(rows, baseline="gemm")
    harness.write_rows(rows, args.csv, device=dev)


if __name__ == "__main__":
    main()

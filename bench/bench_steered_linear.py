"""steered_linear against eager steering code and the bare GEMM, every backend side by side.

Providers (each row shows its ratio to ``gemm`` and to ``eager``):
  gemm      bare F.linear(x, W, b): the floor (cuBLAS on a GPU)
  eager     what users write without fastsplit: W + m·ΔW folded for one m, one weight per row for per-row m,
            LoRA as separate matmuls, the vector as an added bias
  auto      fastsplit.steered_linear (the routing table; the torch compositions where nothing is routed)
  torch     backend="torch": the cuBLAS compositions (ops.steered_linear.steered_linear_torch)
  triton    backend="triton": the decode kernel (GPU; on the CPU only under TRITON_INTERPRET=1)
  compile   torch.compile of the plain reference (--compile; seconds of compile per case)
  torch:fold, torch:two_gemm    local_weight with one m: the fixed compositions the tuner chooses between
  torch:rank_db, torch:add_db   LoRA with per-row m: Δb inside the rank product or added after it

With --tune (FASTSPLIT_TUNE=1 on the CPU) ``auto`` measures its candidates at each row's first call
(fastsplit.ops._tune) and each row also prints auto against the fastest fixed variant (the torch compositions and,
on a GPU, the decode kernel), timed in interleaved rounds (the goal: within 1.05x).

Floors, written down before measuring (H200, bf16): prefill 8×512×3584→18944 is 2·4096·3584·18944 = 556 GFLOP,
0.70 ms at the 790 TFLOP/s GEMM peak; the per-row vector's extra pass over y (2·4096·18944·2 bytes) is 74 µs at
4.2 TB/s, so 1.10× is what a composition without a fused epilogue can reach there. Decode reads W once: 136 MB,
32 µs at 4.2 TB/s; the goal is 80% of that (``bw`` in the decode rows counts each weight byte once, W and ΔW for
local_weight, against the copy bandwidth measured in the same run). Decode rows are timed twice: as eager calls
(host overhead included) and as CUDA-graph replays (device time only), so a kernel is judged by its bytes.

Run: python bench/bench_steered_linear.py [--quick] [--device cuda] [--json out.json] [--compile]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from fastsplit import set_tuning, steered_linear, steered_linear_ref  # noqa: E402
from fastsplit._env import triton_interpreting  # noqa: E402
from fastsplit.ops.steered_linear import steered_linear_torch  # noqa: E402
from fastsplit.tuning import eager_steering  # noqa: E402

FORMS = ("vector", "lora", "local_weight")
MKINDS = ("scalar", "per_row")


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


def providers(device, *, compile_ref=False) -> dict:
    out = {
        "gemm": lambda x, W, b, d, m: F.linear(x, W, b),
        "eager": lambda x, W, b, d, m: eager_steering(x, W, b, **d, m1=m),
        "auto": lambda x, W, b, d, m: steered_linear(x, W, b, **d, m1=m),
        "torch": lambda x, W, b, d, m: steered_linear(x, W, b, **d, m1=m, backend="torch"),
    }
    if device.startswith("cuda") or triton_interpreting():
        out["triton"] = lambda x, W, b, d, m: steered_linear(x, W, b, **d, m1=m, backend="triton")
    variants = {"torch:fold": dict(fold=True), "torch:two_gemm": dict(fold=False), "torch:rank_db": dict(rank_db=True),
                "torch:add_db": dict(rank_db=False)}
    for name, kw in variants.items():
        out[name] = (lambda kw: lambda x, W, b, d, m: steered_linear_torch(x, W, b, **d, m1=m, **kw))(kw)
    if compile_ref:
        # A fresh compiled callable per case: one shared one would hit dynamo's recompile limit and fall back to
        # eager without saying so in the figures.
        comp = torch.compile(lambda *a, **k: steered_linear_ref(*a, **k), dynamic=False)
        out["compile"] = lambda x, W, b, d, m: comp(x, W, b, **d, m1=m)
    return out


def shapes(device, quick):
    """(tag, rows, seq, in, out) per case."""
    if device.startswith("cuda"):
        big = [(3584, 18944), (18944, 3584)]
        pre = [("prefill", 8, 512, k, n) for k, n in big]
        dec = [("decode", r, 1, k, n) for r in ((1, 16) if quick else (1, 4, 16, 64)) for k, n in big]
        return pre + dec
    if quick:
        return [("prefill", 4, 64, 576, 1536), ("decode", 16, 1, 1536, 576)]
    return [("prefill", 8, 128, 576, 1536), ("decode", 16, 1, 1536, 576)]


def weight_bytes(form, k, n, es) -> int:
    return (2 if form == "local_weight" else 1) * k * n * es


def run(device, *, quick=False, rep=10, compile_ref=False, forms=FORMS, mkinds=MKINDS, json_path=None, tune=False):
    """Every (form, m kind, shape) row; returns (harness rows, a dict of figures for summary.json), also written to
    ``json_path`` after every case (a time-out keeps what was measured)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    copy_bw = harness.copy_bandwidth(device) if device.startswith("cuda") else None
    rows, figures = [], {"device": harness.device_name(device), "dtype": str(dtype).replace("torch.", ""),
                         "copy_bandwidth_TBps": copy_bw and copy_bw / 1e12, "cases": []}
    for form in forms:
        for mkind in mkinds:
            for tag, r, t, k, n in shapes(device, quick):
                x, W, b, d = make(form, r, t, k, n, dtype, device)
                m = 1.5 if mkind == "scalar" else torch.linspace(-2, 2, r, device=device)
                xv = f"{tag}:{r * t}x{k}->{n}"
                op = f"steered_linear[{form},{mkind}]"
                up = lambda t: t.float()  # fp32 is reference enough for bf16 errors, and fast on a GPU
                ref = eager_steering(up(x), up(W), up(b), **{key: up(v) for key, v in d.items()}, m1=m)
                case = {"form": form, "mkind": mkind, "shape": xv, "kind": tag, "ms": {}, "graph_ms": {},
                        "relerr": {}}
                for name, fn in providers(device, compile_ref=compile_ref).items():
                    if name == "triton" and tag == "prefill" and not device.startswith("cuda"):
                        continue  # Triton's interpreter: decode shapes only (a prefill takes minutes)
                    if name in ("torch:fold", "torch:two_gemm") and not (form == "local_weight" and mkind == "scalar"):
                        continue  # a variant only where it is a real alternative
                    if name in ("torch:rank_db", "torch:add_db") and not (form == "lora" and mkind != "scalar"):
                        continue
                    call = lambda: fn(x, W, b, d, m)
                    try:
                        with torch.no_grad():
                            y = call()
                            row = harness.time_row(op, name, "fwd", "shape", xv, call, device=device, rep=rep)
                    except Exception as exc:  # a provider that fails is a figure too
                        case["ms"][name] = f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        print(f"{op} {name} {xv}: {case['ms'][name]}")
                        continue
                    rows.append(row)
                    case["ms"][name] = row.p50
                    if name != "gemm":
                        case["relerr"][name] = float((y.float() - ref).norm() / ref.norm())
                    if tag == "decode" and device.startswith("cuda"):
                        g = harness.measure_graph_time(call, device=device, rep=rep)
                        case["graph_ms"][name] = g[0] if g else "capture failed"
                        if g:
                            rows.append(harness.Row(op, name, "graph", "time", "ms", "shape", xv, *g))
                if copy_bw and tag == "decode":
                    wb = weight_bytes(form, k, n, x.element_size())
                    case["bw_share"] = {p: wb / (ms * 1e-3) / copy_bw for p, ms in case["graph_ms"].items()
                                        if isinstance(ms, float)}
                if tune:  # auto against every fixed variant that can run here, interleaved (ratios need that)
                    fixed = {p: fn for p, fn in providers(device).items() if p.startswith("torch")
                             and isinstance(case["ms"].get(p), float)}
                    if "triton" in case["ms"] and isinstance(case["ms"]["triton"], float) and device.startswith("cuda"):
                        fixed["triton"] = providers(device)["triton"]
                    fns = {p: (lambda fn: lambda: fn(x, W, b, d, m))(fn) for p, fn in {"auto": providers(device)["auto"],
                                                                                      **fixed}.items()}
                    with torch.no_grad():
                        inter = harness.measure_interleaved(fns, device=device, rounds=max(rep, 21),
                                                            min_time_s=0.2 if device.startswith("cuda") else 1.5)
                    best = min((p for p in inter if p != "auto"), key=lambda p: inter[p][0])
                    case["interleaved_ms"] = {p: v[0] for p, v in inter.items()}
                    case["auto_over_fastest_fixed"] = inter["auto"][0] / inter[best][0]
                    case["fastest_fixed"] = best
                figures["cases"].append(case)
                _print_case(op, xv, case)
                if json_path:
                    with open(json_path, "w") as f:
                        json.dump(figures, f, indent=2)
    return rows, figures


def _print_case(op, xv, case):
    ms = {p: v for p, v in case["ms"].items() if isinstance(v, float)}
    gemm, eager = ms.get("gemm"), ms.get("eager")
    parts = []
    for p, v in ms.items():
        extra = [f"{v / gemm:.2f}x gemm" if gemm else "", f"{v / eager:.2f}x eager" if eager and p != "eager" else ""]
        bw = case.get("bw_share", {}).get(p)
        extra.append(f"graph {case['graph_ms'][p] * 1e3:.0f} us = {bw:.0%} BW" if bw else "")
        parts.append(f"{p} {v:.4f} ms ({', '.join(e for e in extra if e)})")
    best = case.get("auto_over_fastest_fixed")
    print(f"{op:>34} {xv:<24} " + " | ".join(parts)
          + (f" || interleaved: auto/fastest fixed ({case['fastest_fixed']}) {best:.3f}" if best else ""))


def main():
    p = harness.arg_parser(__doc__)
    p.add_argument("--json", help="also write the figures (ms, ratios, bandwidth shares) to this JSON file")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference as a provider")
    p.add_argument("--tune", action="store_true", help="auto measures its candidates on this device (FASTSPLIT_TUNE=1; "
                   "on a GPU it does by default)")
    args = p.parse_args()
    if args.tune:
        set_tuning(True)
    rows, _ = run(args.device, quick=args.quick, rep=args.rep, compile_ref=args.compile, json_path=args.json,
                  tune=args.tune)
    harness.write_rows(rows, args.csv, device=args.device)


if __name__ == "__main__":
    main()

"""Host overhead per call, CUDA-graph capture and host syncs, for every form × m kind of steered_linear.

At 4×64→64 the GEMMs are trivial, so a call's time is what the host spends: validation, routing, launches.
  CPU  steered_linear (auto) against the same torch composition called directly (ops.steered_linear_torch),
       with and without autograd; goal (issue #23): at most 1.3x. Also auto with tuning on (FASTSPLIT_TUNE=1) once
       its route is cached: what a cache hit adds to a call (goal: at most 1 µs).
  GPU  per-call wall time of N back-to-back calls of F.linear, auto, torch and triton (bf16); goal: auto within
       F.linear + 10 µs for the vector form and + 25 µs for the others. Also: does each backend capture in a CUDA
       graph, and does any op synchronise with the host (torch.cuda.set_sync_debug_mode("error"))?

Run: python bench/bench_overhead.py [--device cuda] [--json out.json]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from fastsplit import set_tuning, split_loss, steered_linear  # noqa: E402
from fastsplit.ops.steered_linear import steered_linear_torch  # noqa: E402

FORMS, MKINDS = ("vector", "lora", "local_weight"), ("scalar", "per_row", "per_token")


def _inputs(form, mkind, device, dtype, grad):
    g = lambda *s: torch.randn(*s, device=device, dtype=torch.float32).to(dtype)
    x, W, b = g(4, 64), g(64, 64), g(64)
    kw = {"delta_bias": g(64)}
    if form == "lora":
        kw.update(lora_a=g(8, 64), lora_b=g(64, 8))
    elif form == "local_weight":
        kw["delta_weight"] = g(64, 64)
    for v in kw.values():
        v.requires_grad_(grad)
    m = {"scalar": 1.5, "per_row": g(4).float(), "per_token": g(4).float()}[mkind]  # 2-D x: per token = per row
    return x, W, b, kw, m


def per_call_us(fn, device, n=None) -> float:
    """Median over 4 rounds of the wall time per call of n back-to-back calls (a sync only at each round's end)."""
    n = n or (300 if device.startswith("cuda") else 2000)
    rounds = []
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(rounds[1:])[1]


def hit_us(x, W, b, kw, m) -> float:
    """What a tuned route's lookup adds to a call: the key and the dict hit (``_auto_route`` on a cached key), the
    best of 7 rounds of 20,000 (a difference of two noisy per-call medians could not resolve a microsecond)."""
    import timeit

    from fastsplit.ops.steered_linear import _auto_route

    args = (x, W, b, kw.get("delta_weight"), kw.get("lora_a"), kw.get("lora_b"), kw.get("delta_bias"), m, None)
    return min(timeit.repeat(lambda: _auto_route(*args), number=20000, repeat=7)) / 20000 * 1e6


def captures(fn) -> bool:
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def syncs(fn) -> bool:
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


def run(device):
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    figures = {"device": harness.device_name(device), "shape": "4x64->64", "dtype": str(dtype).replace("torch.", ""),
               "cases": []}
    backends = ("auto", "torch", "triton") if cuda else ("auto",)
    for form in FORMS:
        for mkind in MKINDS:
            case = {"form": form, "mkind": mkind}
            for grad in ((False,) if cuda else (False, True)):
                x, W, b, kw, m = _inputs(form, mkind, device, dtype, grad)
                ctx = torch.enable_grad if grad else torch.no_grad
                with ctx():
                    direct = per_call_us(lambda: steered_linear_torch(x, W, b, **kw, m1=m), device)
                    calls = {name: per_call_us(lambda: steered_linear(x, W, b, **kw, m1=m, backend=name), device)
                             for name in backends}
                    base = per_call_us(lambda: F.linear(x, W, b), device)
                    if not cuda:  # the tuner's cache hit: tune once, then time the calls that read the route
                        set_tuning(True)
                        steered_linear(x, W, b, **kw, m1=m)
                        calls["auto_tuned"] = per_call_us(lambda: steered_linear(x, W, b, **kw, m1=m), device)
                        hit = hit_us(x, W, b, kw, m)
                        set_tuning(None)
                tag = "grad" if grad else "no_grad"
                case[tag] = {"F.linear_us": base, "composition_us": direct, **{f"{k}_us": v for k, v in calls.items()},
                             "auto_over_composition": calls["auto"] / direct, "auto_minus_linear_us": calls["auto"] - base}
                if "auto_tuned" in calls:
                    case[tag]["cache_hit_us"] = hit
                    case[tag]["auto_tuned_over_composition"] = calls["auto_tuned"] / direct
            if cuda:
                with torch.no_grad():
                    case["cuda_graph"] = {name: captures(lambda: steered_linear(x, W, b, **kw, m1=m, backend=name))
                                          for name in backends}
                    case["host_sync"] = {name: syncs(lambda: steered_linear(x, W, b, **kw, m1=m, backend=name))
                                         for name in backends}
            figures["cases"].append(case)
            row = case["no_grad"]
            print(f"{form:>12} {mkind:>9}: F.linear {row['F.linear_us']:6.1f} us, composition {row['composition_us']:6.1f}, "
                  + ", ".join(f"{k[:-3]} {v:6.1f}" for k, v in row.items() if k.endswith("_us") and k[:-3] in backends)
                  + f"  auto/composition {row['auto_over_composition']:.2f}"
                  + (f" (with autograd {case['grad']['auto_over_composition']:.2f})" if "grad" in case else "")
                  + (f"  tuned: cache hit {row['cache_hit_us']:.2f} us ({case['grad']['cache_hit_us']:.2f} with "
                     f"autograd), auto {row['auto_tuned_over_composition']:.2f}x" if "cache_hit_us" in row else "")
                  + (f"  graph {case['cuda_graph']}  sync {case['host_sync']}" if cuda else ""))
    hp = torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(999, 64, device=device, dtype=dtype)
    lab = torch.randint(0, 999, (2, 8), device=device)

    def step():
        split_loss(hp, hp, W, lab, lab).backward()
    figures["split_loss_tiny_fwd_bwd_us"] = per_call_us(step, device, n=200)
    print(f"split_loss 2x8x64, V 999, forward + backward: {figures['split_loss_tiny_fwd_bwd_us']:.1f} us/call")
    return figures


def main():
    p = harness.arg_parser(__doc__)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the host path, not the BLAS threads
    figures = run(args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

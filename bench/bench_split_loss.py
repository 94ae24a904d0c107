"""split_loss forward+backward: time, TFLOP/s and extra peak memory against full logits and the peers.

Providers:
  naive      fastsplit.split_loss_ref: full [tokens × V] logits on both sides, F.cross_entropy, hinge
  fastsplit  fastsplit.split_loss, backend "auto" (on a GPU: cuBLAS GEMMs around the fused Triton pass)
  torch      backend="torch": the chunked torch path (fp32 logits chunks)
  native     backend="native": the same GEMMs around the extension's CUDA epilogue (GPU, when built with nvcc)
  liger      two calls of Liger-Kernel's fused linear cross-entropy + the hinge (GPU, if installed)
  cce        two calls of cut-cross-entropy's linear_cross_entropy + the hinge (GPU, if installed)

TFLOP/s counts the logits and dH GEMMs of both sides, 8·N·H·V (N tokens a side). The floor is those GEMMs at the
device's peak: at 4×1024 tokens a side, H 3584, V 152064 that is 17.9 TFLOP, 23 ms at 790 TFLOP/s; the fused pass
adds 5·N·V·2 bytes a side (about 13% at H 3584). Goals (issue #24): within 1.15x of the full-logits time, at most
256 MiB of extra memory, ahead of CCE by 1.5x and Liger by 1.3x, whichever is faster.

Every token is a target (no prompt masking). The lm_head is frozen.
Run: python bench/bench_split_loss.py [--quick] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from fastsplit import split_loss, split_loss_ref  # noqa: E402

HP = dict(lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4)


def _hinge_of(pos, neg):
    return HP["lambda_p"] * pos + HP["lambda_n"] * neg + HP["gamma"] * torch.relu(HP["theta"] - (neg - pos))


def peers(device):
    out = {}
    if not device.startswith("cuda"):
        return out
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def liger(hp, hn, W, lp, ln):
            H = hp.shape[-1]
            pos = flce(W, hp[:, :-1].reshape(-1, H), lp[:, 1:].reshape(-1))
            neg = flce(W, hn[:, :-1].reshape(-1, H), ln[:, 1:].reshape(-1))
            return _hinge_of(pos, neg)
        out["liger"] = liger
    except ImportError:
        print("liger-kernel not installed: skipping that provider")
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(hp, hn, W, lp, ln):
            pos = linear_cross_entropy(hp, W, lp, shift=True)
            neg = linear_cross_entropy(hn, W, ln, shift=True)
            return _hinge_of(pos, neg)
        out["cce"] = cce
    except ImportError:
        print("cut-cross-entropy not installed: skipping that provider")
    return out


SHAPES = {"smollm2": (4, 512, 576, 49152), "gemma2-9b": (4, 1024, 3584, 256000),
          "qwen2.5-7b": (4, 1024, 3584, 152064), "quick": (2, 64, 64, 4099)}


def providers(device) -> dict:
    """name -> fn(h_pos, h_neg, W, labels_pos, labels_neg) returning the scalar SPLIT loss."""
    out = {"naive": lambda *a: split_loss_ref(*a, **HP), "fastsplit": lambda *a: split_loss(*a, **HP)}
    if device.startswith("cuda"):
        out["torch"] = lambda *a: split_loss(*a, **HP, backend="torch")
        from fastsplit import native

        if native.cuda_built():
            out["native"] = lambda *a: split_loss(*a, **HP, backend="native")
    return {**out, **peers(device)}


def make_inputs(B, T, H, V, *, device, dtype):
    """(h_pos, h_neg [B, T, H] needing grad, W [V, H] frozen, labels_pos, labels_neg [B, T])."""
    hp = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    hn = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, H, device=device, dtype=torch.float32) * H ** -0.5).to(dtype)
    return hp, hn, W, torch.randint(0, V, (B, T), device=device), torch.randint(0, V, (B, T), device=device)


def run(dev, names, *, quick=False, rep=10, json_path=None):
    """Every provider at every shape; returns (harness rows, a dict of figures for summary.json), also written to
    ``json_path`` after every case (a time-out keeps what was measured)."""
    shapes = {n: SHAPES["quick"] for n in names} if quick else dict(SHAPES)
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    rows, figures = [], {"device": harness.device_name(dev), "dtype": str(dtype).replace("torch.", ""),
                         "skipped": [p for p in ("liger", "cce") if p not in providers(dev)], "cases": []}
    for name in names:
        B, T, H, V = shapes[name]
        hp, hn, W, lp, ln = make_inputs(B, T, H, V, device=dev, dtype=dtype)
        provs = providers(dev)
        xv = f"{name}:B{B}xT{T}x2,H{H},V{V}"
        flops = 2 * 4 * B * T * H * V  # both sides, forward + dH (4·T·H·V each)
        case = {"shape": name, "B": B, "T": T, "H": H, "V": V, "providers": {}}
        for prov, fn in provs.items():
            def step():
                hp.grad = hn.grad = None
                loss = fn(hp, hn, W, lp, ln)
                loss.backward()
                return loss
            try:
                loss = float(step().detach())
                mem = harness.measure_peak_memory(step, device=dev)
                r = harness.time_row("split_loss", prov, "full", "shape", xv, step, device=dev, rep=rep, warmup=1)
            except Exception as exc:  # a provider that fails is a figure too
                case["providers"][prov] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                print(f"{xv} {prov}: FAILED {case['providers'][prov]['error']}")
                continue
            rows += [harness.Row("split_loss", prov, "full", "peak_extra_memory", "MiB", "shape", xv,
                                 mem / 2 ** 20, mem / 2 ** 20, mem / 2 ** 20), r,
                     harness.Row("split_loss", prov, "full", "tflops_fwd_dh", "TFLOP/s", "shape", xv,
                                 flops / r.p50 / 1e9, flops / r.p80 / 1e9, flops / r.p20 / 1e9)]
            case["providers"][prov] = {"ms": r.p50, "tflops": flops / r.p50 / 1e9, "extra_mib": mem / 2 ** 20,
                                       "loss": loss}
        figures["cases"].append(case)
        _print_table(xv, case)
        if json_path:
            import json

            with open(json_path, "w") as f:
                json.dump(figures, f, indent=2)
    return rows, figures


def _print_table(xv, case):
    print(f"== {xv}: ms · TFLOP/s (logits + dH GEMMs of both sides) · extra MiB · loss")
    naive = case["providers"].get("naive", {}).get("ms")
    for prov, f in case["providers"].items():
        if "error" in f:
            print(f"  {prov:>10}  FAILED {f['error']}")
            continue
        ratio = f"  {f['ms'] / naive:.2f}x full logits" if naive else ""
        print(f"  {prov:>10} {f['ms']:9.2f} ms {f['tflops']:6.0f} TF/s {f['extra_mib']:9.0f} MiB  "
              f"loss {f['loss']:.5f}{ratio}")


def main():
    p = harness.arg_parser(__doc__)
    p.add_argument("--shape", choices=["smollm2", "gemma2-9b", "qwen2.5-7b"], action="append")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    dev = args.device
    if dev == "cpu":
        harness.pin_malloc_threshold()
    names = args.shape or (["smollm2"] if dev == "cpu" else ["qwen2.5-7b", "gemma2-9b"])
    rows, _ = run(dev, names, quick=args.quick, rep=args.rep, json_path=args.json)
    harness.write_rows(rows, args.csv, device=dev)


if __name__ == "__main__":
    main()

"""split_loss forward+backward: time and extra peak memory against the naive full-logits path and peers.

Providers:
  naive      fastsplit.split_loss_ref: full [tokens × V] logits on both sides, F.cross_entropy, hinge
  fastsplit  fastsplit.split_loss (torch chunked path on CPU, Triton on GPU)
  liger      two calls of Liger-Kernel's fused linear cross-entropy + the hinge (GPU, if installed)
  cce        two calls of cut-cross-entropy's linear_cross_entropy + the hinge (GPU, if installed)

Every token is a target (no prompt masking), the worst case for fastsplit, which skips masked rows.
The lm_head is frozen. Run: python bench/bench_split_loss.py [--quick] [--device cuda]
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
    return {"naive": lambda *a: split_loss_ref(*a, **HP), "fastsplit": lambda *a: split_loss(*a, **HP),
            **peers(device)}


def make_inputs(B, T, H, V, *, device, dtype):
    """(h_pos, h_neg [B, T, H] needing grad, W [V, H] frozen, labels_pos, labels_neg [B, T])."""
    hp = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    hn = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, H, device=device, dtype=torch.float32) * H ** -0.5).to(dtype)
    return hp, hn, W, torch.randint(0, V, (B, T), device=device), torch.randint(0, V, (B, T), device=device)


def main():
    p = harness.arg_parser(__doc__)
    p.add_argument("--shape", choices=["smollm2", "gemma2-9b", "qwen2.5-7b"], action="append")
    args = p.parse_args()
    dev = args.device
    if dev == "cpu":
        harness.pin_malloc_threshold()
    shapes = dict(SHAPES)
    names = args.shape or (["smollm2"] if dev == "cpu" else ["gemma2-9b", "qwen2.5-7b"])
    if args.quick:
        shapes = {n: SHAPES["quick"] for n in names}
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    rows = []
    for name in names:
        B, T, H, V = shapes[name]
        hp, hn, W, lp, ln = make_inputs(B, T, H, V, device=dev, dtype=dtype)
        provs = providers(dev)
        xv = f"{name}:B{B}xT{T}x2,H{H},V{V}"
        flops = 2 * 4 * B * T * H * V  # both sides, forward + dH (4·T·H·V each)
        losses = {}
        for prov, fn in provs.items():
            def step():
                hp.grad = hn.grad = None
                loss = fn(hp, hn, W, lp, ln)
                loss.backward()
                return loss
            losses[prov] = float(step())
            mem = harness.measure_peak_memory(step, device=dev)
            rows.append(harness.Row("split_loss", prov, "full", "peak_extra_memory", "MiB", "shape", xv,
                                    mem / 2 ** 20, mem / 2 ** 20, mem / 2 ** 20))
            r = harness.time_row("split_loss", prov, "full", "shape", xv, step, device=dev, rep=args.rep, warmup=1)
            rows.append(r)
            rows.append(harness.Row("split_loss", prov, "full", "tflops_fwd_dh", "TFLOP/s", "shape", xv,
                                    flops / r.p50 / 1e9, flops / r.p80 / 1e9, flops / r.p20 / 1e9))
        print(f"{xv}: losses " + ", ".join(f"{k}={v:.5f}" for k, v in losses.items()))
    harness.print_rows(rows, baseline="naive")
    harness.write_rows(rows, args.csv, device=dev)


if __name__ == "__main__":
    main()

"""Difference-of-means against one epoch of SPLIT training on the same pairs (issue: diffmean in at most a tenth of
the time). SmolLM2-135M-Instruct, the demo's pairs, layer 15, CPU (or the GPU if there is one), interleaved rounds.

Floor: diffmean runs each pair's two texts through layers 0..15 once, without gradient: about 2·16/30 of one forward
of the pairs (~0.53 forwards). A SPLIT epoch runs every pair forward through all 30 layers (the frozen prefix once,
cached, then layers 15..29 with per-row m for both completions) and backward through layers 15..29 (about 2x the
forward's FLOPs): about 0.5 + 3·0.5 = 2 forwards of the pairs, before the optimizer and the loss. So the ratio's
floor is near 0.53 / 2 ≈ 0.27 from FLOPs alone; diffmean also skips the head and the loss (a fifth of SmolLM2's
FLOPs a token), so the prediction is 0.1 to 0.25.

Run: python bench/bench_diffmean.py [--pairs 200] [--rounds 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fastsplit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = fastsplit.load_default_model(device=device)
    pairs = fastsplit.demo_pairs()[: args.pairs]
    times = {"diffmean_s": [], "split_epoch_s": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        s = fastsplit.diffmean(model, tok, pairs, layer=15, site="down_proj")
        times["diffmean_s"].append(time.perf_counter() - t0)
        s.detach()
        s = fastsplit.attach(model, 15, "vector")
        t0 = time.perf_counter()
        fastsplit.train(model, tok, s, pairs, epochs=1, theta=2.0, pair_types=("add", "sub"), progress=False)
        times["split_epoch_s"].append(time.perf_counter() - t0)
        s.detach()
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
           "pairs": len(pairs), **{k: min(v) for k, v in times.items()}, "rounds": times}
    res["diffmean_over_split_epoch"] = res["diffmean_s"] / res["split_epoch_s"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

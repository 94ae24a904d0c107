"""torchrun with N ranks against 1 rank, on the same machine: the sharded log-odds sweep and data-parallel
SPLIT training (fastsplit.logodds_sweep / fastsplit.train inside a process group).

Each configuration is launched with ``torch.distributed.run``; every rank loads SmolLM2-135M-Instruct (CPU,
gloo) or random weights at a 7B shape (GPU, NCCL, one GPU per rank). On the CPU the threads are split between
the ranks (OMP_NUM_THREADS = cores // N), so N ranks get the same cores as one: the ratio says what sharding
pairs across processes gains over one process using all cores with intra-op threads. Timed on rank 0 between
barriers, interleaved runs; the model load is outside the timing.

Floors (CPU, 2 cores): the sweep and the training step are GEMM-bound and shard perfectly (no work is
duplicated: each rank runs only its pairs, and DDP's all-reduce is over a 576-float vector), so the ideal
ratio on the same cores is 1.0x; anything above it is intra-op threading's loss on small GEMMs, anything below
is the per-rank overhead (Python, padding of smaller batches).

Run: python bench/bench_distributed.py [--ranks 2] [--pairs 16] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import fastsplit  # noqa: E402


def worker(args) -> None:
    """One rank: time the sweep and one training epoch between barriers; rank 0 writes the times."""
    import torch.distributed as dist

    from bench_workflows import load_model, sweep_pairs

    cuda = torch.cuda.is_available() and args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    torch.manual_seed(0)
    model, tok, label = load_model(dev)
    pairs = sweep_pairs("yesno", args.pairs)
    ms = list(np.linspace(-10, 10, 21))
    layer = 15 if dev == "cpu" else 14
    steering = fastsplit.attach(model, layer, "vector")
    with torch.no_grad():
        steering.module.delta_bias.normal_(0, 0.05)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dist.barrier()
        return time.perf_counter() - t0

    sweep = lambda: fastsplit.logodds_sweep(model, tok, steering, pairs, ms, progress=False)
    train = lambda: fastsplit.train(model, tok, steering, pairs, epochs=1, batch_size=8, progress=False)
    times = {"sweep": [], "train": []}
    sweep()  # warm-up: allocator, first-call paths
    for _ in range(args.runs):
        times["sweep"].append(timed(sweep))
        times["train"].append(timed(train))
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump({"times": times, "label": label, "layer": layer}, f)
    dist.destroy_process_group()


def launch(world: int, args, out: str) -> dict:
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__,
           "--worker-out", out, "--pairs", str(args.pairs), "--runs", str(args.runs), "--device", args.device]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{world} rank(s) failed:\n{r.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = harness.arg_parser(__doc__)
    p.add_argument("--ranks", type=int, default=2, help="the N of N ranks against 1")
    p.add_argument("--pairs", type=int, default=16, help="pairs swept and trained (global)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set in launched ranks
    args = p.parse_args()
    if args.worker_out and "RANK" in os.environ:
        return worker(args)
    if args.quick:
        args.pairs, args.runs = 4, 1
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        raise SystemExit(f"--ranks {args.ranks} needs {args.ranks} GPUs, found {torch.cuda.device_count()}")
    rows, res = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, args.ranks):
            res[world] = launch(world, args, os.path.join(tmp, f"w{world}.json"))
    q = lambda v: (float(np.median(v)), float(np.percentile(v, 20)), float(np.percentile(v, 80)))
    label, layer = res[1]["label"], res[1]["layer"]
    for what in ("sweep", "train"):
        x = f"{label}: {args.pairs} pairs" + (", 21 m" if what == "sweep" else ", 1 epoch, batch 8") + f", layer {layer}"
        for world in (1, args.ranks):
            rows.append(harness.Row(f"dist_{what}", f"{world} rank(s)", "fwd" if what == "sweep" else "full",
                                    "time", "s", "setup", x, *q(res[world]["times"][what])))
        one, many = np.median(res[1]["times"][what]), np.median(res[args.ranks]["times"][what])
        print(f"{what}: 1 rank {one:.2f} s, {args.ranks} ranks {many:.2f} s -> {one / many:.2f}x "
              f"({os.cpu_count()} CPU cores shared)" if args.device == "cpu" else
              f"{what}: 1 rank {one:.2f} s, {args.ranks} ranks {many:.2f} s -> {one / many:.2f}x")
    harness.print_rows(rows, baseline="1 rank(s)")
    harness.write_rows(rows, args.csv, device=args.device)


if __name__ == "__main__":
    main()

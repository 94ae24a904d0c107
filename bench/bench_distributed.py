"""torchrun with 2 ranks against 1, one thread per process (OMP_NUM_THREADS=1), on SmolLM2-135M-Instruct (CPU, gloo).

Rows (issue: "torchrun makes sweeps and training faster"; goals in brackets):
  phase      the log-odds sweep alone, 64 held-out pairs x 21 m, timed between barriers inside the ranks, and each
             rank's busy time (the batches it took and its block of the shared prefix's m rows: the balance)
             [2 ranks <= 0.52x one]; one training epoch on 128 pairs [<= 0.6x]. ``--runs`` rounds, each a launch of
             1 rank then one of 2 (this host's speed drifts by up to 40% between minutes; the ratio is the median of the
             rounds'), and where each rank's sweep time went: on a core, waiting for one, the machine's steal
  command    the whole `fastsplit sweep` command (launch, model load, sweep, fits with a 100-resample bootstrap, plot,
             writes), wall time: 64 pairs x 21 m [<= 0.58x] and 16 pairs x 9 m [<= 0.75x]
  resume     one process: the command killed (SIGKILL) when half of its pairs are in blocks, then `--resume`, in all,
             against an uninterrupted command [<= 1.1x]
  floor      what 2 ranks can reach on this machine: a fixed piece of work (the sweep's GEMMs; the sweep itself on 6
             pairs, whose copies of keys and values and fresh allocations may contend where GEMMs do not; the fits'
             refits) timed in one process alone and in each of two processes at once; two processes slowing each
             other by a factor c (shared caches, memory bandwidth, or two vCPUs on one physical core) bound a
             perfectly divided phase at c/2 of one rank, not 0.5; and the compute floor of one process: the 6-pair
             sweep's GEMM FLOPs (counted) over its time alone, against bare GEMMs at the MLP's shape on one
             core (this core's ceiling): how much a faster sweep could still gain on one core

Floors: with one thread per process, 2 ranks have twice the cores of 1, so the ideal ratio is 0.5x for the parallel
part if the two processes do not slow each other (the floor row measures how much they do); what stays above it is
the serial part (launch, imports and model load: about 8 s per process, in parallel; the exit: about 2 s; rank 0's
writes; its plot is drawn while the other ranks start the bootstrap) and imbalance (the ranks take the sweep's
batches from a shared counter, costliest first, so it is at most about the last batch).

Data: the psychopathy set in ../shared/data (the demo set when it is absent) as 3-token multiple-choice answers
(bench_workflows.sweep_pairs "mc"); a vector at layer 15 trained for one epoch on 96 other pairs of the set (a
random one would leave the fits on noise, where their bootstrap runs to its iteration limits).

Run: python bench/bench_distributed.py [--quick] [--runs 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import fastsplit  # noqa: E402

MS21 = [float(m) for m in np.linspace(-10, 10, 21)]
MS11 = [float(m) for m in np.linspace(-8, 8, 11)]  # the CLI takes at least 10


def _env(threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    return env


def worker(args) -> None:
    """One rank: time the sweep phase and one training epoch between barriers; every rank's busy time and where its
    sweep's time went (:func:`_sched`). One of each per launch: main interleaves the launches of 1 and 2 ranks."""
    import torch.distributed as dist

    from bench_workflows import sweep_pairs

    import fastsplit.engines.transformers as lo

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, tok = fastsplit.load_default_model()
    steering = fastsplit.load_steering(model, args.steering)
    pairs = sweep_pairs("mc", args.pairs)
    busy = {"t": 0.0, "depth": 0}

    def counted(real):  # this rank's own work (the batches it took; its block of the shared prefix's m rows)
        def run(*a, **k):  # only the outermost call counts
            t0, busy["depth"] = time.perf_counter(), busy["depth"] + 1
            try:
                return real(*a, **k)
            finally:
                busy["depth"] -= 1
                busy["t"] += 0.0 if busy["depth"] else time.perf_counter() - t0
        return run
    lo._batch_nll, lo._prefix_caches = counted(lo._batch_nll), counted(lo._prefix_caches)

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    fastsplit.logodds_sweep(model, tok, steering, pairs[:4], MS21, progress=False)  # warm-up
    busy["t"], before = 0.0, _sched()
    out = {"sweep": timed(lambda: fastsplit.logodds_sweep(model, tok, steering, pairs, MS21, progress=False))}
    out["busy"], out["sched"] = busy["t"], {k: v - before[k] for k, v in _sched().items()}
    train_pairs = sweep_pairs("mc", args.pairs + args.train_pairs)[args.pairs:]
    s2 = fastsplit.attach(model, 10, "vector")
    out["train"] = timed(lambda: fastsplit.train(model, tok, s2, train_pairs, epochs=1, batch_size=8, progress=False))
    s2.detach()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump(every, f)
    fastsplit.dist.shutdown()


def _sched() -> dict:
    """Where this rank's time went, in seconds so far: on a core (``run``), ready but waiting for one (``wait``: another
    process held it), and the whole machine's steal (``steal``: the hypervisor ran something else on a vCPU; the guest
    cannot tell which of its vCPUs lost it). From Linux's schedstat of the main thread, which runs all the math here
    (one thread per process); empty where there is no /proc."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            run, wait = (int(x) / 1e9 for x in f.read().split()[:2])
        with open("/proc/stat") as f:
            steal = int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return {}
    return {"run": run, "wait": wait, "steal": steal}


def floor_worker(kind: str, steering: str | None = None) -> None:
    """A fixed piece of work on one thread; prints its seconds. gemm: the model's MLP shapes, as the sweep runs them;
    sweep: the log-odds sweep of 6 pairs x 21 m in one process (timed after the model loads and one warm-up pair);
    fits: held-out refits of a preference curve, as the analysis runs them (scipy, mostly interpreter time);
    sweep-flops: prints the GEMM FLOPs of that sweep (counted by torch's FlopCounterMode, not timed), then this core's
    rate of bare GEMMs at the MLP's shape, in FLOP/s."""
    torch.set_num_threads(1)
    if kind == "sweep-flops":
        from torch.utils.flop_counter import FlopCounterMode

        work = _sweep_work(steering)
        with FlopCounterMode(display=False) as counter:
            work()
        rows, hidden, inner = GEMM_SHAPE
        x, w = torch.randn(rows, hidden), torch.randn(hidden, inner)
        for _ in range(5):  # warm-up
            x @ w
        t0 = time.perf_counter()
        for _ in range(GEMM_STEPS):
            x @ w
        print(counter.get_total_flops(), GEMM_STEPS * 2 * rows * hidden * inner / (time.perf_counter() - t0))
        return
    work = {"gemm": _gemm_work, "sweep": lambda: _sweep_work(steering), "fits": _fits_work}[kind]()  # untimed set-up
    t0 = time.perf_counter()
    work()
    print(time.perf_counter() - t0)


GEMM_STEPS, GEMM_SHAPE = 150, (512, 576, 1536)


def _gemm_work():
    rows, hidden, inner = GEMM_SHAPE

    def run():
        x, w = torch.randn(rows, hidden), torch.randn(hidden, inner)
        for _ in range(GEMM_STEPS):
            x = torch.tanh(x @ w) @ w.T * 0.01
    return run


def _sweep_work(steering: str):
    from bench_workflows import sweep_pairs

    model, tok = fastsplit.load_default_model()
    s = fastsplit.load_steering(model, steering)
    pairs = sweep_pairs("mc", 6)
    fastsplit.logodds_sweep(model, tok, s, pairs[:1], MS21, progress=False)  # warm-up
    return lambda: fastsplit.logodds_sweep(model, tok, s, pairs, MS21, progress=False)


def _fits_work():
    from fastsplit.analysis import fit_curves

    def run():
        rng = np.random.default_rng(0)
        ms = np.linspace(-10, 10, 21)
        y = 0.4 * ms * np.exp(-(ms / 6) ** 2) + rng.normal(0, 0.05, (16, 21))
        fit = fit_curves(ms, y, "preference")
        for j in list(range(21)) * 2:
            keep = np.arange(21) != j
            fit_curves(ms[keep], y[:, keep], "preference", starts=1, init=fit, tol=1e-6)
    return run


def floor(runs: int, steering: str) -> tuple[dict, dict]:
    """Per kind of work, c = (seconds of the work in each of two processes at once) / (seconds alone), median over
    interleaved runs; and the compute floor of one process (:func:`floor_worker`'s sweep-flops)."""
    out = {}
    for kind in ("gemm", "sweep", "fits"):
        cmd = [sys.executable, __file__, "--floor-worker", kind, "--steering", steering]
        alone, pair = [], []
        for _ in range(runs):
            done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True)
            alone.append(float(done.stdout.split()[-1]))  # the last line: the seconds
            procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, text=True) for _ in range(2)]
            pair.append(float(np.mean([float(p.communicate()[0].split()[-1]) for p in procs])))
        c = float(np.median(pair) / np.median(alone))
        out[kind] = {"alone_s": alone, "pair_s": pair, "slowdown": c, "floor_ratio": c / 2}
    # The compute floor of one process: the sweep's GEMM FLOPs at this core's rate of bare GEMMs. The sweep's rate
    # against it says how much a faster sweep could still gain on one core (attention, copies, the interpreter).
    cmd = [sys.executable, __file__, "--floor-worker", "sweep-flops", "--steering", steering]
    last = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    flops, gemm_rate = (float(v) for v in last.split())
    sweep_rate = flops / float(np.median(out["sweep"]["alone_s"]))
    compute = {"sweep_gemm_flops": flops, "gemm_flops_per_s": gemm_rate, "sweep_flops_per_s": sweep_rate,
               "sweep_share_of_gemm_rate": sweep_rate / gemm_rate}
    return out, compute


def _torchrun(world: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args]


def phase(world, args, tmp) -> list:
    out = os.path.join(tmp, f"phase{world}.json")
    cmd = _torchrun(world, __file__, "--worker-out", out, "--steering", args.steering, "--pairs", str(args.pairs),
                    "--train-pairs", str(args.train_pairs))
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{world} rank(s) failed:\n{r.stderr[-3000:]}")
    return json.load(open(out))


def sweep_command(world, data, ms, out, args, *extra) -> list:
    return _torchrun(world, "-m", "fastsplit", "sweep", "--steering", args.steering, "--data", data,
                     "--multipliers=" + ",".join(f"{m:g}" for m in ms), "--bootstrap", "100", "--device", "cpu",
                     "--quiet", "--out", out, *extra)


def command(world, data, ms, tmp, args, runs) -> list[float]:
    times = []
    for _ in range(runs):
        out = tempfile.mkdtemp(dir=tmp, prefix=f"cmd-{world}-{len(ms)}-")
        t0 = time.perf_counter()
        r = subprocess.run(sweep_command(world, data, ms, out, args), env=_env(), capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"sweep with {world} rank(s) failed:\n{r.stderr[-3000:]}")
    return times


def resume(data, n_pairs, tmp, args) -> dict:
    """One process: killed when half the pairs are in blocks, then resumed; against an uninterrupted command."""
    base = os.path.join(tmp, "resume-base")
    os.makedirs(base)
    whole = command(1, data, MS21, base, args, 1)[0]
    out = os.path.join(tmp, "killed")
    blocks = os.path.join(out, "blocks")
    t0 = time.perf_counter()
    proc = subprocess.Popen(sweep_command(1, data, MS21, out, args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done = 0
    while proc.poll() is None:
        if os.path.isdir(blocks):
            done = sum(len(json.load(open(os.path.join(blocks, f)))["items"]) for f in os.listdir(blocks)
                       if f.startswith("block-"))
            if done >= n_pairs // 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    killed_at = time.perf_counter() - t0
    t1 = time.perf_counter()
    r = subprocess.run(sweep_command(1, data, MS21, out, args, "--resume"), env=_env(), capture_output=True, text=True)
    resumed = time.perf_counter() - t1
    if r.returncode != 0:
        raise SystemExit(f"the resumed sweep failed:\n{r.stderr[-3000:]}")
    a = np.loadtxt(os.path.join(base, os.listdir(base)[0], "sweep.csv"), delimiter=",", skiprows=1, usecols=(3, 4))
    b = np.loadtxt(os.path.join(out, "sweep.csv"), delimiter=",", skiprows=1, usecols=(3, 4))
    return {"uninterrupted_s": whole, "killed_after_s": killed_at, "pairs_done_when_killed": done,
            "resumed_s": resumed, "ratio": (killed_at + resumed) / whole, "max_abs_diff": float(np.abs(a - b).max())}


def main() -> None:
    p = harness.arg_parser(__doc__)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--train-pairs", type=int, default=128)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--which", default="floor,phases,commands,resume",
                   help="what to time: floor (two processes slowing each other), phases (sweep and training between "
                        "barriers), commands, resume")
    p.add_argument("--floor-worker", default=None, help=argparse.SUPPRESS)  # one process of the floor row
    p.add_argument("--steering", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set in launched ranks
    args = p.parse_args()
    if args.worker_out and "RANK" in os.environ:
        return worker(args)
    if args.floor_worker:
        return floor_worker(args.floor_worker, args.steering)
    if args.quick:
        args.pairs, args.train_pairs, args.runs = 8, 16, 1
    from bench_workflows import sweep_pairs

    from fastsplit.cli._common import write_pairs

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = fastsplit.load_default_model()
        s = fastsplit.attach(model, 15, "vector")
        # A trained vector (one epoch on pairs not swept): its curves are what sweeps meet; a random one gives
        # flat noise, on which the fits' bootstrap runs to its iteration limits and measures nothing real.
        fastsplit.train(model, tok, s, fastsplit.balance_answers(sweep_pairs("mc", args.pairs + 96)[args.pairs:]),
                        epochs=1, theta=2.0, pair_types=("add", "sub"), lr=2e-2, progress=False)
        args.steering = os.path.join(tmp, "steering.safetensors")
        s.save(args.steering)
        data64, data16 = os.path.join(tmp, "p64.jsonl"), os.path.join(tmp, "p16.jsonl")
        write_pairs(sweep_pairs("mc", args.pairs), data64)
        write_pairs(sweep_pairs("mc", 16), data16)
        res = {"device": harness.device_name("cpu"), "threads_per_process": 1, "pairs": args.pairs}
        which = set(args.which.split(","))
        med = lambda v: float(np.median(v))
        if "floor" in which:
            res["floor"], res["compute"] = floor(1 if args.quick else 3, args.steering)
            for kind, f in res["floor"].items():
                print(f"floor, {kind}: alone {med(f['alone_s']):.2f} s, each of two at once {med(f['pair_s']):.2f} s "
                      f"-> two processes slow each other {f['slowdown']:.2f}x; a perfectly divided phase on 2 ranks "
                      f">= {f['floor_ratio']:.3f}x", flush=True)
            compute = res["compute"]
            print(f"compute, one process: the sweep's GEMMs {compute['sweep_gemm_flops'] / 1e9:.0f} GFLOP at "
                  f"{compute['sweep_flops_per_s'] / 1e9:.1f} GFLOP/s, {compute['sweep_share_of_gemm_rate']:.0%} of "
                  f"this core's rate of bare GEMMs ({compute['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s at "
                  f"{'x'.join(map(str, GEMM_SHAPE))})", flush=True)
        runs = 1 if args.quick else args.runs
        if "phases" in which:
            rounds = []  # one launch of 1 rank, then one of 2, per round: a drift of the machine's speed hits both
            for _ in range(runs):
                rounds.append({w: phase(w, args, tmp) for w in (1, 2)})
                print(f"  round {len(rounds)}: sweep phase " + ", ".join(
                    f"{w} rank(s) {rounds[-1][w][0]['sweep']:.1f} s" for w in (1, 2)) + "; each rank's sweep: "
                    + " | ".join(", ".join(f"{k} {v:.1f} s" for k, v in r["sched"].items()) for w in (1, 2)
                                 for r in rounds[-1][w]) + " (on a core, waiting for one, the machine's steal)",
                    flush=True)
            rank0 = lambda key: {w: [rd[w][0][key] for rd in rounds] for w in (1, 2)}
            for row, key in (("sweep_phase", "sweep"), ("train", "train")):
                t = rank0(key)
                res[f"{row}_runs_s"], res[f"{row}_s"] = t, {w: med(v) for w, v in t.items()}
                res[f"{row}_round_ratios"] = [b / a for a, b in zip(t[1], t[2])]
                res[f"{row}_ratio"] = med(res[f"{row}_round_ratios"])
            res["busy_s_per_rank"] = {w: [med([rd[w][r]["busy"] for rd in rounds]) for r in range(w)] for w in (1, 2)}
            res["sched_s_per_rank"] = {w: [[r["sched"] for r in rd[w]] for rd in rounds] for w in (1, 2)}
            print(f"sweep phase {args.pairs} pairs x 21 m: 1 rank {res['sweep_phase_s'][1]:.1f} s, 2 ranks "
                  f"{res['sweep_phase_s'][2]:.1f} s -> {res['sweep_phase_ratio']:.3f}x, the median of the rounds' "
                  f"{[round(x, 3) for x in res['sweep_phase_round_ratios']]} (busy per rank "
                  f"{[round(b, 1) for b in res['busy_s_per_rank'][2]]} s)", flush=True)
            print(f"training {args.train_pairs} pairs, 1 epoch: 1 rank {res['train_s'][1]:.1f} s, 2 ranks "
                  f"{res['train_s'][2]:.1f} s -> {res['train_ratio']:.3f}x "
                  f"{[round(x, 3) for x in res['train_round_ratios']]}", flush=True)
        for label, data, ms in (("64x21", data64, MS21), ("16x11", data16, MS11)) if "commands" in which else ():
            every = {1: [], 2: []}
            for _ in range(runs):  # interleaved, so a drift of the machine's speed hits both alike
                for w in (1, 2):
                    every[w] += command(w, data, ms, tmp, args, 1)
            t = {w: med(v) for w, v in every.items()}
            res[f"command_{label}_s"], res[f"command_{label}_runs_s"] = t, every
            res[f"command_{label}_ratio"] = t[2] / t[1]
            print(f"whole sweep command {label}: 1 rank {t[1]:.1f} s, 2 ranks {t[2]:.1f} s -> {t[2] / t[1]:.3f}x "
                  f"(runs: {[round(v, 1) for v in every[1]]}, {[round(v, 1) for v in every[2]]})", flush=True)
        if "resume" in which:
            res["resume"] = resume(data64, args.pairs, tmp, args)
            print(f"resume: killed at {res['resume']['pairs_done_when_killed']} pairs done, killed run "
                  f"{res['resume']['killed_after_s']:.1f} s + resumed {res['resume']['resumed_s']:.1f} s against "
                  f"{res['resume']['uninterrupted_s']:.1f} s uninterrupted -> {res['resume']['ratio']:.3f}x "
                  f"(max |ΔNLL| {res['resume']['max_abs_diff']:.2g})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

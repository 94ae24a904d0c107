"""Stress the teardown of fastsplit's distributed work: many two-rank gloo launches, and torchrun CLI sweeps.

Why: ranks of tests/test_distributed.py aborted at exit in CI ("terminate called without an active exception",
SIGABRT), after both had written their results. The cause, found with this script's tools (stacks of a rank held
after ``destroy_process_group``, reference counts): a reference to the default group outlived
``destroy_process_group`` (torch.distributed.nn.functional's default arguments, when torch._dynamo imports it after
``init_process_group``), so gloo's threads lived on into interpreter finalization. fastsplit.dist's import notes
and ``fastsplit.dist.shutdown`` hold the fix; tests/test_distributed.py checks every launch for it.

What a launch is: two ranks forked from this process (torch, fastsplit and the tests' tasks are imported once here,
so a launch costs its work, not two interpreter starts), each initialising gloo over a file store, running one of
tests/test_distributed.py's tasks, tearing down, and leaving through the interpreter's own finalization
(``SystemExit``, never ``os._exit``). Contention: ``--parallel`` launches at once, ``--pin`` puts both ranks of a
launch on one core, and every rank sleeps a random while before and after its teardown. Core dumps are enabled
in the ranks; a rank that dies by a signal has its core read with gdb (``thread apply all bt``; ``--install-gdb``
installs Debian's gdb first when it is missing), and the stacks are written beside its log.

``--leak`` recreates the state before the fix: the default group captured by a function's default argument after
``init_process_group``, and the teardown of old (``barrier``, ``destroy_process_group``, nothing released).

``--cli N``: N runs of ``torchrun --standalone --nproc-per-node 2 -m fastsplit sweep`` on a tiny saved model; each
must exit 0.

Examples::

    python bench/stress_teardown.py --launches 500 --parallel 2 --pin --json teardown.json
    python bench/stress_teardown.py --launches 500 --leak            # the state before the fix, for comparison
    python bench/stress_teardown.py --launches 0 --cli 100
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fastsplit  # noqa: E402
from tests import test_distributed as td  # noqa: E402 - the tasks the tests run

ABORT_TEXT = "terminate called"


def _rank(rank: int, folder: str, task: str, leak: bool, pin: int | None) -> int:
    """One rank, in a forked child: its exit status is the launch's verdict for this rank."""
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    os.chdir(folder)  # a core file lands here (core_pattern "core")
    log = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    import faulthandler

    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    if leak:
        captured = dist.group.WORLD

        def held(group=captured):  # a module-level function's default, as torch.distributed.nn.functional's were
            return group
        globals()["_held"] = held
    td.TASKS[task](folder, rank)
    time.sleep(random.random() * 0.05)
    if leak:
        dist.barrier()
        dist.destroy_process_group()
    else:
        fastsplit.dist.shutdown()
    time.sleep(random.random() * 0.05)
    return 0


def _fork_rank(rank, folder, task, leak, pin) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child leaves through finalization, as a spawned or torchrun rank does
        code = 1
        try:
            code = _rank(rank, folder, task, leak, pin)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        raise SystemExit(code)
    return pid


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def _gdb(folder: str, install: bool) -> str | None:
    """Every thread's stack from the core a rank left in ``folder`` (None: no core)."""
    cores = sorted(glob.glob(os.path.join(folder, "core*")))
    if not cores:
        return None
    if shutil.which("gdb") is None and install:
        subprocess.run(["apt-get", "install", "-y", "-q", "gdb"], capture_output=True)
    if shutil.which("gdb") is None:
        return f"core at {cores[0]}; gdb is not installed (--install-gdb)"
    out = subprocess.run(["gdb", "-batch", "-ex", "info threads", "-ex", "thread apply all bt 40", sys.executable,
                          cores[0]], capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def launches(n: int, *, parallel: int, task: str, leak: bool, pin: bool, root: str, install_gdb: bool,
             progress: bool = True) -> dict:
    """``n`` two-rank launches, ``parallel`` at once; what went wrong, per launch."""
    cores = sorted(os.sched_getaffinity(0))
    failures, done, t0 = [], 0, time.perf_counter()
    while done < n:
        batch = []
        for j in range(min(parallel, n - done)):
            i = done + j
            folder = os.path.join(root, f"launch-{i:04d}")
            os.makedirs(folder)
            core = cores[i % len(cores)] if pin else None
            batch.append((i, folder, [_fork_rank(r, folder, task, leak, core) for r in range(2)]))
        for i, folder, pids in batch:
            states = [_status(os.waitpid(pid, 0)[1]) for pid in pids]
            logs = [open(os.path.join(folder, f"rank{r}.log"), errors="replace").read() for r in range(2)]
            if states != ["exit 0", "exit 0"] or any(ABORT_TEXT in text for text in logs):
                stacks = _gdb(folder, install_gdb)
                if stacks:
                    with open(os.path.join(folder, "gdb.txt"), "w") as f:
                        f.write(stacks)
                failures.append({"launch": i, "ranks": states, "folder": folder, "core_read": bool(stacks),
                                 "log_tail": [text[-600:] for text in logs]})
            else:
                shutil.rmtree(folder, ignore_errors=True)
        done += len(batch)
        if progress:
            print(f"\r{done}/{n} launches, {len(failures)} failed, {time.perf_counter() - t0:.0f} s", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {"launches": n, "failed": len(failures), "seconds": round(time.perf_counter() - t0, 1),
            "failures": failures}


def cli_runs(n: int, root: str, progress: bool = True) -> dict:
    """``n`` torchrun sweeps of two ranks on a tiny saved model; each must exit 0."""
    if n == 0:
        return {"runs": 0, "failed": 0, "seconds": 0.0, "failures": []}
    from tests.tiny import tiny_model, tiny_tokenizer

    model = os.path.join(root, "tiny-llama")
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    steer_dir = os.path.join(root, "steer")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    fs = [sys.executable, "-m", "fastsplit"]
    subprocess.run(fs + ["train", "--model", model, "--layer", "1", "--epochs", "1", "--test-size", "0.9", "--out",
                         steer_dir, "--quiet"], check=True, capture_output=True, env=env)
    failures, t0 = [], time.perf_counter()
    for i in range(n):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "fastsplit", "sweep", "--model", model, "--steering",
                            os.path.join(steer_dir, "steering.safetensors"), "--data", "demo", "--max-pairs", "4",
                            "--multipliers=" + ",".join(str(v) for v in range(-5, 6)), "--bootstrap", "0",
                            "--device", "cpu", "--quiet", "--out", os.path.join(root, f"sweep-{i}")],
                           capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0 or ABORT_TEXT in r.stderr:
            failures.append({"run": i, "returncode": r.returncode, "stderr_tail": r.stderr[-1500:],
                             "errors": [line for line in r.stderr.splitlines() if "Error" in line][-6:]})
        shutil.rmtree(os.path.join(root, f"sweep-{i}"), ignore_errors=True)
        if progress:
            print(f"\r{i + 1}/{n} torchrun sweeps, {len(failures)} failed, {time.perf_counter() - t0:.0f} s", end="",
                  file=sys.stderr, flush=True)
    if progress and n:
        print(file=sys.stderr)
    return {"runs": n, "failed": len(failures), "seconds": round(time.perf_counter() - t0, 1), "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=500, help="two-rank launches (default: 500)")
    ap.add_argument("--parallel", type=int, default=2, help="launches at once (default: 2)")
    ap.add_argument("--task", default="gather", choices=sorted(td.TASKS), help="the tests' task each launch runs")
    ap.add_argument("--pin", action="store_true", help="both ranks of a launch on one core")
    ap.add_argument("--leak", action="store_true", help="the state before the fix (see the module's docstring)")
    ap.add_argument("--cli", type=int, default=0, help="torchrun CLI sweeps to run after the launches")
    ap.add_argument("--install-gdb", action="store_true", help="install Debian's gdb when a core needs reading")
    ap.add_argument("--keep", help="folder for the launches' files (default: a temporary one, removed)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    if args.launches < 0 or args.parallel < 1 or args.cli < 0:
        ap.error("--launches and --cli take counts >= 0, --parallel >= 1")
    with open("/proc/sys/kernel/core_pattern") as f:
        pattern = f.read().strip()
    root = args.keep or tempfile.mkdtemp(prefix="fastsplit-teardown-")
    os.makedirs(root, exist_ok=True)
    result = {"host": _host(), "torch": torch.__version__, "core_pattern": pattern, "task": args.task,
              "leak": args.leak, "pin": args.pin, "parallel": args.parallel}
    result["fork"] = launches(args.launches, parallel=args.parallel, task=args.task, leak=args.leak, pin=args.pin,
                              root=root, install_gdb=args.install_gdb)
    result["cli"] = cli_runs(args.cli, root)
    text = json.dumps(result, indent=1)
    if args.json:
        fastsplit.dist.atomic_write(args.json, lambda p: open(p, "w").write(text))
    print(text)
    if not args.keep and not result["fork"]["failed"]:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if result["fork"]["failed"] or result["cli"]["failed"] else 0


def _host() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or 'cpu'} x{os.cpu_count()}"


if __name__ == "__main__":
    sys.exit(main())

"""The one benchmark harness: timing, peak memory, and a long-format CSV.

Every bench_*.py builds ``Row``s through ``measure_time`` / ``measure_peak_memory`` and appends
them with ``write_rows``. Columns: op, provider, mode (fwd/bwd/full), metric, unit, x_name,
x_value, p50, p20, p80, device, timestamp, version.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

import fastsplit

DEFAULT_CSV = os.path.join(os.path.dirname(__file__), "results.csv")


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    metric: str
    unit: str
    x_name: str
    x_value: str
    p50: float
    p20: float
    p80: float
    device: str = ""
    timestamp: str = ""
    version: str = fastsplit.__version__


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return statistics.median(xs), qs[1], qs[7]  # p50, p20, p80


def measure_time(fn: Callable[[], object], *, device: str, warmup: int = 3, rep: int = 10,
                 min_time_s: float = 0.0) -> tuple[float, float, float]:
    """Milliseconds per call of ``fn`` as (p50, p20, p80): CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start < min_time_s:
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def measure_interleaved(fns: dict, *, device: str, warmup: int = 2, rounds: int = 21, min_time_s: float = 0.0) -> dict:
    """(p50, p20, p80) ms per provider, timed in interleaved rounds: each round calls every provider once, in a
    rotated order, so drift in clocks or machine load falls on all alike (what a ratio between providers needs).
    At least ``rounds`` rounds, and more until each provider has run ``min_time_s`` in all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict = {n: [] for n in names}
    r = 0
    while r < rounds or min(sum(v) for v in times.values()) < min_time_s * 1e3:
        r += 1
        for n in names[r % len(names):] + names[:r % len(names)]:
            if device.startswith("cuda"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                fns[n]()
                b.record()
                torch.cuda.synchronize()
                times[n].append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: _quantiles(v) for n, v in times.items()}


def measure_graph_time(fn: Callable[[], object], *, device: str, rep: int = 10, calls: int = 20):
    """Device time per call of ``fn`` (ms, p50/p20/p80) from replays of a CUDA graph that holds ``calls`` calls:
    host overhead removed, what the kernels themselves take. None when ``fn`` cannot be captured."""
    if not device.startswith("cuda"):
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):  # warm-up outside the graph: autotuning, lazy allocations
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            for _ in range(calls):
                fn()
    except Exception:
        return None
    p50, p20, p80 = measure_time(graph.replay, device=device, rep=rep)
    return p50 / calls, p20 / calls, p80 / calls


def copy_bandwidth(device: str, mib: int = 2048) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write) of ``mib`` MiB: the memory ceiling decode is
    judged against, measured in the same run."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = measure_time(lambda: dst.copy_(src), device=device, rep=10)
    return 2 * src.numel() / (p50 * 1e-3)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def pin_malloc_threshold() -> None:
    """Re-exec this process with glibc's mmap threshold fixed at 128 KiB.

    glibc raises its mmap threshold after large frees, so later allocations come from the heap and RSS
    depends on what ran before; a fixed threshold maps and unmaps every large tensor, and VmHWM then
    tracks live memory. Call it first thing in a CPU benchmark that measures memory.
    """
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and platform.system() == "Linux":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.execv(sys.executable, [sys.executable] + sys.argv)


def measure_peak_memory(fn: Callable[[], object], *, device: str) -> float:
    """Extra peak memory (bytes) that one call of ``fn`` needs above what is allocated before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset through
    /proc/self/clear_refs just before the call (Linux), so inputs made beforehand do not count; see
    :func:`pin_malloc_threshold`.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _proc_status("VmRSS")
    fn()
    return float(_proc_status("VmHWM") - base)


def time_row(op, provider, mode, x_name, x_value, fn, *, device, **kw) -> Row:
    p50, p20, p80 = measure_time(fn, device=device, **kw)
    return Row(op, provider, mode, "time", "ms", x_name, str(x_value), p50, p20, p80)


def write_rows(rows: list[Row], path: str, *, device: str) -> None:
    """Append rows to the long-format CSV at ``path`` (header written once)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    name = device_name(device)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        if new:
            w.writeheader()
        for r in rows:
            r.device, r.timestamp = name, stamp
            w.writerow(asdict(r))


def print_rows(rows: list[Row], baseline: str | None = None) -> None:
    """A readable table; with ``baseline`` each time row also shows its ratio to that provider."""
    base = {(r.op, r.mode, r.metric, r.x_value): r.p50 for r in rows if r.provider == baseline}
    for r in rows:
        ratio = base.get((r.op, r.mode, r.metric, r.x_value))
        extra = f"  x{r.p50 / ratio:.2f} vs {baseline}" if ratio else ""
        print(f"{r.op:>16} {r.mode:>4} {r.provider:>18} {r.x_name}={r.x_value:<14} "
              f"{r.metric}: {r.p50:10.4g} {r.unit} [p20 {r.p20:.4g}, p80 {r.p80:.4g}]{extra}")


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=DEFAULT_CSV, help="long-format CSV to append to")
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    return p

"""``backend="auto"`` measures its candidates on the device it runs on, verifies them, and caches the fastest.

How a call is routed (the ops ask :data:`TUNER` with a key and the candidates that can run):

1. **In memory**: a dict from the call's key (op, form, m kind, row bucket, dtype, K and N buckets, the device)
   to the route; a hit costs a dict lookup (``bench/bench_overhead.py``: well under a microsecond).
2. **On disk**: one JSON per device and software versions under ``<cache>/tune/`` (``fastsplit._env.cache_root``),
   read once per process; a corrupted, foreign or stale file is ignored with one warning and rewritten.
3. **Tuned, once per key, eagerly**: every candidate runs once on the call's own tensors and is checked against
   a float64 reference on a sample of rows and columns under flash-attention's rule (error at most 3x that of
   the torch path in the same dtype, plus a floor), gradients included where autograd is on; the ones that pass
   are timed (CUDA events on a GPU, the wall clock on the CPU: a warm-up, then up to 5 interleaved rounds within
   the key's budget, median) and the fastest is chosen. A candidate that raises (a compile failure, out of
   resources) or disagrees is recorded with its reason, never chosen, and named once in a warning. The cache entry
   says what it cost: ``tune_ms`` of timed runs (BUDGET_MS bounds it), ``verify_ms`` of first runs (compiles).
4. **Never tuned** inside CUDA-graph capture, ``torch.compile`` tracing, or on a stream other than the device's
   default one: there the cached route, else the static default (the routing table, the fold threshold, the
   chunk rules) is used, and nothing is remembered, so the next eager call tunes.
5. **Ranks agree**: inside an initialised process group the first rank to settle a key publishes its route in
   the group's store (an atomic compare-and-set), and every rank takes the published one, so data-parallel
   ranks run the same kernels without a collective that could wait on a rank that never meets the key.

``FASTSPLIT_TUNE=0`` turns tuning off (the static defaults decide); on the CPU it is off unless
``FASTSPLIT_TUNE=1`` (:func:`fastsplit._env.tuning`).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import _env, dist

log = logging.getLogger("fastsplit")

FORMAT = "fastsplit.tune/1"
BUDGET_MS = 50.0  # device time one key's tuning may take at LLM shapes (the cache entry says what it took)
CPU_BUDGET_MS = 250.0
REPEATS = 5  # timed rounds at most (plus a warm-up); at least MIN_ROUNDS when the budget is short
MIN_ROUNDS = 2
# flash-attention's rule (tests/helpers.py says the same): a candidate's error against float64 is at most FA_FACTOR
# times the torch path's own error in the same dtype, plus a floor relative to the reference's scale.
FA_FACTOR = 3.0
FA_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1): the size classes a route is tuned for."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass
class Candidate:
    """One way to compute a call. ``run()`` returns the call's outputs (a tensor or a tuple of tensors);
    ``torch_path``: a composition of the torch backend, whose error sets the tolerance of the others."""
    name: str
    run: Callable[[], object]
    torch_path: bool = False


@dataclass
class Check:
    """How to verify a candidate's outputs: ``sample(outputs)`` -> tensors to compare with ``reference`` (the
    same parts in float64), all of ``outputs`` must be finite."""
    sample: Callable[[object], Sequence[Tensor]]
    reference: Sequence[Tensor]


@dataclass
class Entry:
    """A tuned key: the route, every candidate's time (ms) or the reason it was refused, and what tuning cost:
    ``tune_ms`` the timed runs (device time on a GPU), ``verify_ms`` the first runs' wall time (compiles included)."""
    choice: str
    times: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    tune_ms: float = 0.0
    when: str = ""
    verify_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"choice": self.choice, "times_ms": self.times, "refused": self.errors,
                "tune_ms": round(self.tune_ms, 4), "verify_ms": round(self.verify_ms, 4), "when": self.when}

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        if not isinstance(d, dict) or not isinstance(d.get("choice"), str):
            raise ValueError("an entry without a choice")
        return cls(d["choice"], dict(d.get("times_ms", {})), dict(d.get("refused", {})),
                   float(d.get("tune_ms", 0.0)), str(d.get("when", "")), float(d.get("verify_ms", 0.0)))


# --- where tuning may run -------------------------------------------------------------------------------------------

def may_tune(device: torch.device) -> bool:
    """Tuning is on for this device type and nothing would break: not while compiling, capturing a CUDA graph, or on
    a stream other than the device's default stream (the candidates would run, and be timed, on the wrong one)."""
    if not _env.tuning(device.type) or torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return False
        return torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
    return True


# --- the device and the software a measurement belongs to -----------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


_IDENTITY: dict = {}


def device_identity(device: torch.device) -> dict:
    """{"name", "capability"} of ``device`` (the CPU's model and core count on the CPU), read once per device."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index)
    if key not in _IDENTITY:
        if device.type == "cuda":
            _IDENTITY[key] = {"name": torch.cuda.get_device_name(index),
                              "capability": list(torch.cuda.get_device_capability(index))}
        else:
            _IDENTITY[key] = {"name": f"{_cpu_name()} x{os.cpu_count()} threads={torch.get_num_threads()}",
                              "capability": None}
    return _IDENTITY[key]


@functools.lru_cache(maxsize=None)
def _software() -> tuple:
    return tuple(_read_software().items())


def software() -> dict:
    """The versions a measurement depends on: torch, Triton, CUDA and fastsplit (read once per process)."""
    return dict(_software())


def _read_software() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ._backend import TRITON_VERSION

    try:
        own = version("fastsplit")
    except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path
        own = "unknown"
    return {"torch": torch.__version__, "triton": TRITON_VERSION, "cuda": torch.version.cuda, "fastsplit": own}


def cache_path(device: torch.device) -> str:
    """The cache file of ``device`` with this install's versions: ``<cache>/tune/<device>-<versions hash>.json``
    (under the cache folder as ``FASTSPLIT_CACHE`` says now)."""
    ident, soft = device_identity(device), software()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ident["name"]).strip("-").lower()[:60] or device.type
    if ident["capability"]:
        slug += "-sm" + "".join(map(str, ident["capability"]))
    digest = hashlib.sha256(json.dumps([ident, soft], sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(_env.cache_root(), "tune", f"{slug}-{digest}.json")


# --- timing and checking --------------------------------------------------------------------------------------------

def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU (device time), the wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], object], device: torch.device, budget_ms: float) -> tuple[float, float]:
    """(median ms of ``fn``, ms spent): one warm-up, then as many repeats (1 to REPEATS) as ``budget_ms`` allows."""
    first = time_once(fn, device)
    reps = max(1, min(REPEATS, int(budget_ms / max(first, 1e-6)) - 1))
    times = [time_once(fn, device) for _ in range(reps)]
    return statistics.median(times), first + sum(times)


def budget_ms(device: torch.device) -> float:
    """One key's timing budget: BUDGET_MS on a GPU; on the CPU (opt-in tuning, calls of milliseconds, a noisier
    clock) CPU_BUDGET_MS."""
    return BUDGET_MS if device.type == "cuda" else CPU_BUDGET_MS


def max_error(parts: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    err = 0.0
    for a, r in zip(parts, reference):
        if r.numel():
            err = max(err, float((a.double() - r).abs().max()))
    return err


def _scale(reference: Sequence[Tensor]) -> float:
    return max([1.0] + [float(r.abs().max()) for r in reference if r.numel()])


def _finite(out) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return all(bool(torch.isfinite(t).all()) for t in outs if isinstance(t, Tensor) and t.is_floating_point())


# --- the tuner ------------------------------------------------------------------------------------------------------

class Tuner:
    """Routes of ``backend="auto"``: memory, then the disk cache, then a measurement (see the module docstring).

    ``once(fn, device) -> ms`` times one call (:func:`time_once`); tests inject their own.
    ``runs`` counts candidate runs (tests: a cached key runs none)."""

    def __init__(self):
        self.memory: dict = {}  # key -> the op's parsed route (what a hit returns)
        self.names: dict = {}  # key -> the route's name
        self.texts: dict = {}  # key -> its spelling in the cache file
        self.once: Callable = time_once
        self.runs = 0
        self._files: dict[str, dict] = {}  # cache path -> {key: Entry} read from disk
        self._warned: set = set()

    def clear(self, *, disk: bool = False) -> None:
        """Forget the routes in memory (as a new process would); ``disk=True`` also what was read from disk."""
        self.memory.clear()
        self.names.clear()
        if disk:
            self._files.clear()

    def text(self, key: tuple) -> str:
        """How the cache file spells ``key`` (the op's own spelling once it has routed the key)."""
        return self.texts.get(key) or key_text(key)

    def entry(self, key: tuple, device: torch.device) -> Optional[Entry]:
        """What the cache holds for ``key`` (times, refusals, cost), or None (not tuned, or one candidate only)."""
        return self._disk(cache_path(device), device).get(self.text(key))

    def forget(self, key: tuple, device: torch.device) -> None:
        """Drop ``key``'s route from memory and from what was read of the disk, so its next call tunes again (the
        new measurement then replaces the file's entry)."""
        self.memory.pop(key, None)
        self.names.pop(key, None)
        self._disk(cache_path(device), device).pop(self.text(key), None)

    def route(self, key: tuple, device: torch.device, build: Callable[[], tuple[list[Candidate], Optional[Check]]],
              default: str, *, parse: Callable[[str], object] = str, text: Callable[[tuple], str] | None = None,
              group=None):
        """``parse(route)`` for ``key`` on a memory miss: the disk cache's route, else a measurement where
        :func:`may_tune` allows, else ``default`` (not remembered then). ``build()`` gives the candidates and the
        check; the memory keeps ``parse(route)``, so a hit costs the op nothing more. ``text(key)`` spells the key
        for the cache file (default :func:`key_text`)."""
        self.texts[key] = (text or key_text)(key)
        choice = self._route(key, device, build, default, group)
        if key in self.memory:  # remembered (not a default taken where tuning may not run)
            self.names[key] = choice
            self.memory[key] = parse(choice)
            return self.memory[key]
        return parse(choice)

    def _route(self, key, device, build, default, group) -> str:
        text = self.texts[key]
        path = cache_path(device)
        entry = self._disk(path, device).get(text)
        tuned = entry is None
        if tuned:
            if not may_tune(device):
                return default
            candidates, check = build()
            if len(candidates) == 1:  # nothing to measure: the one way there is
                self.memory[key] = candidates[0].name
                return candidates[0].name
            entry = self._tune(text, candidates, check, device)
        choice = self._agree(text, entry.choice, group)
        if choice in entry.errors:  # correct before agreed: a route refused here never runs here
            log.warning("fastsplit: another rank routes %s to %s, which this rank refused (%s); this rank keeps %s",
                        text, choice, entry.errors[choice], entry.choice)
            choice = entry.choice
        elif choice != entry.choice:  # another rank settled the key first: its route, for every rank
            entry = Entry(choice, entry.times, entry.errors, entry.tune_ms, entry.when, entry.verify_ms)
        if tuned:
            self._files[path][text] = entry
            self._save(path, device, text, entry)
        self.memory[key] = choice
        return choice

    def _tune(self, text: str, candidates: list[Candidate], check: Optional[Check], device) -> Entry:
        outputs, errors, verify = {}, {}, 0.0
        for c in candidates:  # the first run of each: compile, warm up, verify
            try:
                self.runs += 1
                t0 = time.perf_counter()
                out = c.run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                verify += (time.perf_counter() - t0) * 1e3
                if not _finite(out):
                    errors[c.name] = "non-finite output"
                    continue
                outputs[c.name] = check.sample(out) if check is not None else None
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is recorded and never chosen
                errors[c.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if check is not None and outputs:
            base = [max_error(outputs[c.name], check.reference) for c in candidates
                    if c.torch_path and c.name in outputs]
            dtype = next((p.dtype for ps in outputs.values() for p in ps), torch.float32)
            allowed = FA_FACTOR * max(base, default=0.0) + FA_FLOOR.get(dtype, 1e-6) * _scale(check.reference)
            for name in list(outputs):
                err = max_error(outputs[name], check.reference)
                if not err <= allowed:  # NaN-safe
                    errors[name] = (f"disagrees with the float64 reference: max error {err:.3g} > allowed {allowed:.3g}"
                                    f" ({FA_FACTOR:g}x the torch path's own error plus the floor)")
                    del outputs[name]
        times, spent = self._time(candidates, outputs, errors, device)
        if errors:
            new = [n for n in errors if (text, n) not in self._warned]
            if new:
                self._warned.update((text, n) for n in new)
                log.warning("fastsplit: auto-tuning %s refused %s; %s", text,
                            "; ".join(f"{n} ({errors[n]})" for n in new),
                            "never routed there" if times else "the torch path runs")
        fallback = next(c.name for c in candidates if c.torch_path) if any(c.torch_path for c in candidates) \
            else candidates[0].name
        choice = min(times, key=times.get) if times else fallback
        return Entry(choice, times, errors, spent, _now(), verify)

    def _time(self, candidates, outputs, errors, device) -> tuple[dict, float]:
        """Median ms of each verified candidate, timed in interleaved rounds (each round runs every candidate once,
        in a rotated order, so drift in clocks or load falls on all of them alike): a warm-up round, then up to
        REPEATS rounds as the key's budget allows (at least MIN_ROUNDS)."""
        passing = [c for c in candidates if c.name in outputs]
        samples: dict = {c.name: [] for c in passing}
        spent, first = 0.0, {}
        for c in passing:  # warm-up, and the first estimate of each candidate's cost
            try:
                first[c.name] = self.once(c.run, device)
                spent += first[c.name]
            except Exception as exc:  # noqa: BLE001
                errors[c.name] = f"{type(exc).__name__} while timing: {str(exc).splitlines()[0] if str(exc) else ''}"
        alive = [c for c in passing if c.name in first]
        per_round = sum(first.values()) or 1e-6
        rounds = max(MIN_ROUNDS, min(REPEATS, int((budget_ms(device) - spent) / per_round)))
        for r in range(rounds):
            for c in alive[r % len(alive):] + alive[:r % len(alive)] if alive else []:
                self.runs += 1
                ms = self.once(c.run, device)
                samples[c.name].append(ms)
                spent += ms
        return {c.name: statistics.median(samples[c.name]) for c in alive}, spent

    # --- ranks -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _agree(text: str, choice: str, group) -> str:
        group = dist.active_group(group)
        if group is None:
            return choice
        return dist.first_published(f"fastsplit/tune/{text}", choice)

    # --- disk ------------------------------------------------------------------------------------------------------
    def _disk(self, path: str, device) -> dict:
        if path not in self._files:
            self._files[path] = self._read(path, device)
        return self._files[path]

    def _read(self, path: str, device) -> dict:
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                data = json.load(f)
            head = (data.get("format"), data.get("device"), data.get("software"))
            if head != (FORMAT, device_identity(device), software()):
                raise ValueError(f"written for {data.get('device')} with {data.get('software')}, not this device "
                                 f"and install ({device_identity(device)}, {software()})")
            return {k: Entry.from_dict(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("fastsplit: ignoring the tuning cache %s (%s); it will be rewritten", path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return {}

    def _save(self, path: str, device, text: str, entry: Entry) -> None:
        """Merge ``entry`` into the file under a lock (other processes may write the same file), atomically."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with dist.file_lock(path + ".lock"):
                entries = {}
                if os.path.exists(path):
                    try:
                        with open(path) as f:
                            data = json.load(f)
                        if (data.get("format"), data.get("device"), data.get("software")) == \
                                (FORMAT, device_identity(device), software()):
                            entries = dict(data.get("entries", {}))
                    except (OSError, ValueError, AttributeError):
                        entries = {}  # corrupted: rewritten whole below
                entries[text] = entry.to_dict()
                doc = {"format": FORMAT, "device": device_identity(device), "software": software(),
                       "entries": entries}
                dist.atomic_write(path, lambda p: _dump(doc, p))
        except OSError as exc:  # a read-only cache folder costs the next process a tuning, nothing else
            if ("save", path) not in self._warned:
                self._warned.add(("save", path))
                log.warning("fastsplit: cannot write the tuning cache %s (%s); routes stay in memory", path, exc)


def _dump(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def key_text(key: tuple) -> str:
    """A key as the cache file writes it: ``op|form|mkind|rows<=R|dtype|K<=k|N<=n|...``."""
    return "|".join(str(k).replace("torch.", "") for k in key)


def sample_rows(m: int, count: int = 8) -> list[int]:
    """Rows to verify on: the first, the last, the middle and a deterministic spread (edge tiles included)."""
    if m <= count:
        return list(range(m))
    picks = {0, m - 1, m // 2, 1, m - 2}
    step = max(1, m // count)
    picks.update(range(step // 2, m, step))
    return sorted(picks)[:count] if len(picks) > count else sorted(picks)


def sample_cols(n: int, count: int = 256) -> list[int]:
    return list(range(n)) if n <= count else sorted({0, n - 1, *range(0, n, math.ceil(n / (count - 2)))})


TUNER = Tuner()


def cache_info(device: str | torch.device | None = None) -> dict:
    """Where this device's tuning cache is and what it holds: {"path", "exists", "entries": {key: route}}."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = cache_path(dev)
    entries = TUNER._read(path, dev) if os.path.exists(path) else {}
    return {"path": path, "exists": os.path.exists(path), "tuning": _env.tuning(dev.type),
            "entries": {k: e.choice for k, e in entries.items()}}

"""Every Triton kernel of fastsplit compiled for named GPU targets, on a machine without a GPU.

Why: fastsplit's GPU code reaches a GPU rarely, and the failures seen on the last ones were of a kind that needs no
GPU to find: a launch config whose shared memory exceeds the device's per-block limit. Triton compiles a kernel to
a cubin for a named target without a device (TTIR → TTGIR → LLVM → PTX → ptxas, which ships in the triton wheel);
the result's metadata says how much shared memory the block asks for, and ptxas's log says its registers and
spills.

What is compiled: the launches the launchers themselves make. Each case (form, m kind, dtype, rows, shape) is run
through the real launcher on ``meta`` tensors with the launch recorded instead of made, so the arguments, the
constexprs and the grid are the launcher's own; Triton's own argument specialisation (divisibility by 16, ints
equal to 1) turns them into the signature and attributes a launch on the target would compile with. The decode
kernel then compiles at the test suite's fixed config and, in the ``ci`` matrix, at the config its default launch
takes on that target (the first of ``gpu_configs()`` whose estimate fits and that does not spill there); the
``full`` matrix compiles every config of the list (what the tuner and ``FASTSPLIT_AUTOTUNE=1`` draw on) at more
cases, about 2,600 compiles: for a machine with cores to spare, by hand. On two cores a compile takes 0.6–50 s, so
CI runs ``ci`` (and ``bench/gpu_check.sh`` runs ``ci`` for the device's own target).

What fails the check, per (kernel, case, config, target) that the code would launch there (every config whose hand
estimate fits the target's per-block shared memory, and the fixed config):
- the compile fails;
- the compiled shared memory exceeds the target's per-block limit;
- the hand estimate (``footprint``: what keeps configs off a device) is below what Triton allocated.
Register spills (ptxas's "bytes spill stores") are recorded and listed, not failed: ``--write-spills`` merges them
into ``fastsplit/kernels/spills.json``, which the launches read to skip a config that spills on the device's target
(and the ``ci`` matrix's default config skips it too, as the launch does). Configs whose estimate exceeds a
target's limit are compiled and recorded too in the ``full`` matrix (the table shows how far the estimate is from
the truth), but never fail: no route launches them there.
Triton's compile cache is bypassed (``always_compile``), so every row carries ptxas's figures.

Usage::

    python -m fastsplit.kernels.check_targets --json targets.json            # the CI matrix
    python -m fastsplit.kernels.check_targets --matrix full --json t.json    # every dtype, row tile and shape
    python -m fastsplit.kernels.check_targets --write-spills                 # update the spill table launches read

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels the check compiles). Each entry of the
JSON table holds what ``triton.compile`` was given (signature, constexprs, attributes, options) so that one entry
can be recompiled alone (:func:`compile_entry`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

# Per-block shared memory a kernel may opt into (bytes), and the SM count the decode kernel's split plan sees, of
# the device each target stands for: A100, H100/H200, B200, RTX 5090.
TARGETS = {80: {"smem": 166912, "sms": 108, "device": "A100"},
           90: {"smem": 232448, "sms": 132, "device": "H100/H200"},
           100: {"smem": 232448, "sms": 148, "device": "B200"},
           120: {"smem": 101376, "sms": 170, "device": "RTX 5090"}}

FIXED_TARGET = 90  # where the test suite runs with FASTSPLIT_FIXED_CONFIGS=1 (bench/gpu_check.sh): the ci matrix
# compiles the fixed config there, the full matrix everywhere

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass
class Launch:
    """One launch a launcher makes: the kernel (module:name), its arguments as Triton binds them, the options, the
    hand estimate of its shared memory (None where the kernel has none) and the case it serves."""
    kernel: str
    args: dict
    options: dict
    case: dict
    estimate: Optional[int] = None
    config: str = "fixed"  # "fixed", "reduce", or "gpu_configs[i]"


def _dtype(name):
    import torch

    return getattr(torch, DTYPES[name])


@contextlib.contextmanager
def _recording(records: list, sms: int):
    """The launchers of fastsplit.kernels record their launches instead of making them."""
    from . import split_loss as sk
    from . import steered_linear as sl

    saved = (sl._launch, sl._sm_count, sl._common.tuned, sk._split_fused_kernel)
    state = {}

    def launch(kernel, grid, args, meta, *, traced):
        records.append((kernel, args, dict(meta), state.pop("footprint", None)))

    def tuned(kernel, configs, footprint, device, **kw):
        state["footprint"] = footprint
        return kernel, {}

    class Fused:
        def __getitem__(self, grid):
            return lambda *args, **meta: records.append((saved[3], args, meta, None))

    sl._launch, sl._sm_count, sl._common.tuned, sk._split_fused_kernel = launch, (lambda device: sms), tuned, Fused()
    try:
        yield
    finally:
        sl._launch, sl._sm_count, sl._common.tuned, sk._split_fused_kernel = saved


def _name(kernel) -> str:
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def _bind(kernel, args: tuple, meta: dict) -> dict:
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in meta.items() if k in names})
    missing = [n for n in names if n not in bound]
    if missing:
        raise ValueError(f"{kernel.__name__}: the launch leaves {missing} unbound")
    return bound


def _options(meta: dict) -> dict:
    return {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}


def decode_cases(matrix: str) -> list[dict]:
    """The steered-linear decode kernel's cases: form × m kind × dtype × rows × shape. ``ci``: the dtypes of two
    element sizes, one row (the row count Triton specialises) and 64 (the largest row tile), on a layer whose K is
    split; ``full`` adds fp16, 16 and 32 rows, LoRA rank 64, and an output wide enough that K is not split."""
    full = matrix == "full"
    dtypes = ["bf16", "fp16", "fp32"] if full else ["bf16", "fp32"]
    rows = [1, 16, 32, 64] if full else [1, 64]
    forms = [("vector", 0), ("lora", 16), ("local_weight", 0)] + ([("lora", 64)] if full else [])
    # (N, K): 18944 -> 3584 splits K on every target; 4096 -> 65536 does not
    shapes = [(3584, 18944), (65536, 4096)] if full else [(3584, 18944)]
    return [dict(form=f, rank=r, m="rows" if per_row else "scalar", dtype=d, rows=m, N=n, K=k)
            for (f, r), per_row, d, m, (n, k) in itertools.product(forms, (False, True), dtypes, rows, shapes)]


def split_loss_cases(matrix: str) -> list[dict]:
    """The SPLIT loss's fused pass: dtype × soft-capping × with or without the gradient."""
    dtypes = ["bf16", "fp16", "fp32"] if matrix == "full" else ["bf16", "fp32"]
    return [dict(dtype=d, softcap=cap, need_grad=g)
            for d, cap, g in itertools.product(dtypes, (None, 30.0), (False, True))]


def launches(matrix: str, target: int) -> list[Launch]:
    """Every launch fastsplit's launchers make for the cases of ``matrix`` on ``target`` (SM count from TARGETS)."""
    import torch

    from . import _common
    from . import split_loss as sk
    from . import steered_linear as sl

    budget = TARGETS[target]["smem"]
    out: list[Launch] = []
    meta_dev = torch.device("meta")
    for case in decode_cases(matrix):
        dt = _dtype(case["dtype"])
        M, N, K, r = case["rows"], case["N"], case["K"], case["rank"]
        x = torch.empty(M, K, dtype=dt, device=meta_dev)
        w = torch.empty(N, K, dtype=dt, device=meta_dev)
        b = torch.empty(N, dtype=dt, device=meta_dev)
        dw = torch.empty(N, K, dtype=dt, device=meta_dev) if case["form"] == "local_weight" else None
        la = torch.empty(r, K, dtype=dt, device=meta_dev) if case["form"] == "lora" else None
        lb = torch.empty(N, r, dtype=dt, device=meta_dev) if case["form"] == "lora" else None
        db = torch.empty(N, dtype=dt, device=meta_dev)
        m_rows = torch.empty(M, dtype=torch.float32, device=meta_dev) if case["m"] == "rows" else None
        records: list = []
        with _recording(records, TARGETS[target]["sms"]):
            sl.launch_fwd(x, w, b, dw, la, lb, db, m_rows, m_rows, 1.5, 1.5)
        for kernel, args, meta, footprint in records:
            name = _name(kernel)
            if footprint is None:  # the split's reduction: its fixed launch
                out.append(Launch(name, _bind(kernel, args, meta), _options(meta), case, None, "reduce"))
                continue
            flags = {k: v for k, v in meta.items() if k not in ("BLOCK_K", "num_warps", "num_stages")}
            configs = [(f"gpu_configs[{i}]", c) for i, c in enumerate(sl.gpu_configs())]
            if matrix != "full":  # the config the default launch takes on this target: the first that fits and
                # does not spill there (the spill table), as launch_fwd picks it
                spilled = _common.spilled(f"sm_{target}", sl.KERNEL, sl.spill_variant(flags, M, dt))
                fit = _common.without_spills([c for _, c in configs], footprint, budget, spilled)
                configs = [configs[i] for i in fit[:1]] or configs[:1]
            if matrix == "full" or target == FIXED_TARGET:
                configs = configs + [("fixed", sl.FIXED)]
            for label, cfg in configs:
                launch_meta = {**flags, **cfg.kwargs}
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                out.append(Launch(name, _bind(kernel, args, launch_meta), opts, case,
                                  footprint(_common.config_meta(cfg)), label))
    for case in split_loss_cases(matrix):
        dt = _dtype(case["dtype"])
        C, V = 8, 152064
        z = torch.empty(C, V, dtype=dt, device=meta_dev)
        tgt = torch.empty(C, dtype=torch.int64, device=meta_dev)
        nll = torch.empty(C, dtype=torch.float32, device=meta_dev)
        records = []
        with _recording(records, TARGETS[target]["sms"]):
            sk.launch_fused(z, tgt, nll, nll, case["softcap"], case["need_grad"])
        for kernel, args, meta, _ in records:
            out.append(Launch(_name(kernel), _bind(kernel, args, meta), _options(meta), case, None, "fixed"))
    return out


def _specialize(kernel, bound: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher derives them from the bound arguments."""
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl as spec
    except ImportError:  # older Triton: the same rules in Python
        spec = None
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        if spec is not None:
            ty, key = spec(BaseBackend, value, p.is_const, not p.do_not_specialize,
                           not p.do_not_specialize_on_alignment)
        else:  # pragma: no cover - Triton without the native binder
            ty, key = _py_specialize(value)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str) and "D" in key:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _py_specialize(value):  # pragma: no cover - Triton without the native binder
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                      torch.int64: "i64", torch.int32: "i32"}[value.dtype], "D"
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    if value is None:
        return "constexpr", None
    raise TypeError(f"cannot specialise {type(value).__name__}")


def entry_of(launch: Launch, target: int) -> dict:
    """The JSON row of one (launch, target), before compiling: everything ``triton.compile`` is given."""
    module, name = launch.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    signature, constexprs, attrs = _specialize(kernel, launch.args)
    return {"kernel": launch.kernel, "target": f"sm_{target}", "case": launch.case, "config": launch.config,
            "signature": signature, "constexprs": {kernel.arg_names[k[0]]: v for k, v in constexprs.items()},
            "attrs": {kernel.arg_names[k[0]]: v for k, v in attrs.items()}, "options": launch.options,
            "estimate": launch.estimate, "limit": TARGETS[target]["smem"],
            "launched": launch.estimate is None or launch.config == "fixed"
            or launch.estimate <= TARGETS[target]["smem"]}


_PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def compile_entry(entry: dict) -> dict:
    """Compile one entry for its target; adds ``shared`` (bytes), ptxas's registers, spills and stack, the
    compile's seconds, or ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = entry["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    index = {n: i for i, n in enumerate(kernel.arg_names)}
    src = ASTSource(fn=kernel, signature=dict(entry["signature"]),
                    constexprs={(index[k],): v for k, v in entry["constexprs"].items()},
                    attrs={(index[k],): v for k, v in entry["attrs"].items()})
    target = GPUTarget("cuda", int(entry["target"].removeprefix("sm_")), 32)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit runs no ptxas: no registers, no spills
    log = io.StringIO()
    t0 = time.perf_counter()
    out = dict(entry)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=dict(entry["options"]))
    except Exception as exc:  # noqa: BLE001 - recorded: a config that does not compile is the finding
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    out["shared"] = int(compiled.metadata.shared)
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        found = re.search(pattern, text)
        out[key] = int(found.group(1)) if found else (0 if key != "regs" else None)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def problems(row: dict) -> list[str]:
    """Why a compiled row fails the check (empty: it passes). Only rows the code launches on their target fail."""
    if not row["launched"]:
        return []
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["shared"] > row["limit"]:
        found.append(f"asks {row['shared']} B of shared memory, over the target's {row['limit']}")
    if row["estimate"] is not None and row["estimate"] < row["shared"]:
        found.append(f"hand estimate {row['estimate']} B is below the {row['shared']} B Triton allocated")
    return found


def spills(row: dict) -> Optional[str]:
    """What a row spills, if anything: recorded, not a failure (``--write-spills`` puts it in the spill table, and
    launches on that target then skip the config)."""
    if row.get("spill_stores"):
        return f"spills {row['spill_stores']} B of registers ({row['regs']} registers)"
    return None


def run(matrix: str = "ci", targets: Optional[list[int]] = None, workers: Optional[int] = None,
        extra: Optional[list[Launch]] = None, progress: bool = True) -> dict:
    """Compile every entry of ``matrix`` for ``targets`` (default: all of TARGETS) in ``workers`` processes;
    returns {"rows": [...], "failures": [...], ...}. ``extra``: more launches (a test plants one)."""
    from .._env import triton_interpreting

    if triton_interpreting():
        raise RuntimeError("check_targets compiles the real kernels: run it without TRITON_INTERPRET=1")
    targets = targets or list(TARGETS)
    entries, seen = [], set()
    for t in targets:
        for launch in launches(matrix, t) + list(extra or []):
            e = entry_of(launch, t)
            key = json.dumps([e["kernel"], e["target"], e["signature"], e["constexprs"], e["attrs"], e["options"]],
                             sort_keys=True, default=str)
            if key in seen:  # another case that compiles to the same kernel: compiled once, listed once
                continue
            seen.add(key)
            entries.append(e)
    t0 = time.perf_counter()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, row in enumerate(pool.map(compile_entry, entries, chunksize=1)):
            row["problems"] = problems(row)
            row["spills"] = spills(row)
            rows.append(row)
            if progress:
                print(f"\rcompiled {i + 1}/{len(entries)} ({time.perf_counter() - t0:.0f} s)", end="",
                      file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    import triton

    failures = [r for r in rows if r["problems"]]
    return {"triton": triton.__version__, "matrix": matrix, "targets": [f"sm_{t}" for t in targets],
            "entries": len(rows), "launched": sum(r["launched"] for r in rows), "failures": len(failures),
            "spilling": sum(bool(r["spills"]) and r["launched"] for r in rows),
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


# The CUDA extension's targets (setup.py's default FASTSPLIT_CUDA_ARCHS, plus sm_120 where nvcc has it) and their
# per-block shared memory.
NVCC_ARCHS = {"80": 166912, "90a": 232448, "100": 232448, "120": 101376}
_NVCC_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")


def _demangled(name: str) -> str:
    """The kernel's readable name from its mangled one (``split_lse_kernel<bf16>``); the mangled one if unsure."""
    found = re.search(r"\d+(split_\w+?_kernel)(I(\d+__nv_bfloat16|6__half|f)E)?", name)
    if not found:
        return name
    kind = {"13__nv_bfloat16": "<bf16>", "6__half": "<fp16>", "f": "<fp32>"}.get(found.group(3) or "", "")
    return found.group(1) + kind


def cuda_rows(csrc: Optional[str] = None) -> dict:
    """Each kernel of the CUDA extension (csrc/cuda/*.cu) compiled by nvcc for each target it supports, with
    ptxas's registers, spills, stack and static shared memory (``-Xptxas -v``); ``skipped`` says why none ran
    (no nvcc, no csrc/: an installed wheel carries no sources)."""
    import glob
    import shutil
    import subprocess
    import tempfile

    csrc = csrc or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    nvcc = shutil.which("nvcc")
    if not sources or nvcc is None:
        return {"skipped": "no csrc/cuda sources here" if not sources else "nvcc not found", "rows": []}
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = [a for a in NVCC_ARCHS if f"compute_{a.rstrip('a')}" in listed]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src, arch in itertools.product(sources, archs):
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--use_fast_math", "-I",
                   os.path.join(csrc, "include"), "-Xptxas", "-v", src, "-o", os.path.join(tmp, "k.cubin")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            base = {"source": os.path.relpath(src, os.path.dirname(csrc)), "target": f"sm_{arch}",
                    "limit": NVCC_ARCHS[arch], "command": " ".join(cmd[1:])}
            if r.returncode != 0:
                rows.append({**base, "kernel": None, "error": r.stderr.strip()[-500:]})
                continue
            parts = _NVCC_ENTRY.split(r.stderr)
            for name, _, text in zip(parts[1::3], parts[2::3], parts[3::3]):
                row = {**base, "kernel": _demangled(name), "symbol": name}
                for key, pattern in {**_PTXAS, "shared": r"(\d+) bytes smem"}.items():
                    found = re.search(pattern, text)
                    row[key] = int(found.group(1)) if found else 0
                rows.append(row)
    for row in rows:
        row["problems"] = cuda_problems(row)
    return {"nvcc": listed and subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            .strip().splitlines()[-1], "targets": [f"sm_{a}" for a in archs], "rows": rows}


def cuda_problems(row: dict) -> list[str]:
    if row.get("error"):
        return [f"does not compile: {row['error'].splitlines()[-1]}"]
    found = []
    if row["shared"] > row["limit"]:
        found.append(f"asks {row['shared']} B of shared memory, over the target's {row['limit']}")
    if row["spill_stores"]:
        found.append(f"spills {row['spill_stores']} B of registers")
    return found


def _row_variant(row: dict) -> str:
    """The spill table's key of a decode-kernel row (what ``steered_linear.spill_variant`` makes at launch)."""
    from . import steered_linear as sl

    flags = {k: v for k, v in row["constexprs"].items() if k not in ("BLOCK_K", "M")}
    return sl.spill_variant(flags, row["case"]["rows"], _dtype(row["case"]["dtype"]))


def spill_doc(rows: list, existing: Optional[dict] = None) -> dict:
    """The spill table with this run's findings merged into ``existing`` (a ``ci`` run keeps what a ``full`` run
    found): every decode-kernel config of ``gpu_configs()`` that ptxas made spill, per target and variant."""
    from . import _common
    from . import steered_linear as sl

    doc = existing if existing and existing.get("format") == _common.SPILLS_FORMAT else \
        {"format": _common.SPILLS_FORMAT, "spills": {}}
    import triton

    doc["triton"] = triton.__version__
    for row in rows:
        label = row["config"]
        if not row.get("spill_stores") or not label.startswith("gpu_configs[") or \
                not row["kernel"].endswith(":" + sl.KERNEL):
            continue
        index = label[len("gpu_configs["):-1]
        variants = doc["spills"].setdefault(row["target"], {}).setdefault(sl.KERNEL, {})
        variants.setdefault(_row_variant(row), {})[index] = row["spill_stores"]
    return doc


def summary(result: dict) -> str:
    lines = [f"{result['entries']} compiles ({result['launched']} launchable) for {', '.join(result['targets'])} "
             f"in {result['seconds']} s, Triton {result['triton']}: {result['failures']} failing, "
             f"{result.get('spilling', 0)} launchable ones spilling registers"]
    for r in result["rows"]:
        case = ", ".join(f"{k}={v}" for k, v in r["case"].items())
        for p in r["problems"] + ([f"(recorded) {r['spills']}"] if r.get("spills") and r["launched"] else []):
            lines.append(f"  {r['kernel'].split(':')[1]} {r['target']} {r['config']} ({case}): {p}")
    cuda = result.get("cuda")
    if cuda is not None:
        if cuda.get("skipped"):
            lines.append(f"CUDA extension: not compiled ({cuda['skipped']})")
        else:
            bad = [r for r in cuda["rows"] if r["problems"]]
            lines.append(f"CUDA extension: {len(cuda['rows'])} kernels × targets for {', '.join(cuda['targets'])}: "
                         f"{len(bad)} failing")
            lines += [f"  {r['kernel']} {r['target']}: {p}" for r in bad for p in r["problems"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastsplit.kernels.check_targets",
                                 description="Compile every Triton kernel and config for named GPU targets.")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--matrix", choices=["ci", "full"], default="ci", help="which cases (default: ci)")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)),
                    help="compute capabilities, comma-separated (default: %(default)s)")
    ap.add_argument("--workers", type=int, help="compile processes (default: one per core)")
    ap.add_argument("--write-spills", nargs="?", const="", metavar="PATH",
                    help="merge the configs that spill into the spill table the launches read (default: the "
                         "package's kernels/spills.json)")
    args = ap.parse_args(argv)
    try:
        targets = [int(t) for t in args.targets.split(",") if t]
    except ValueError:
        ap.error(f"--targets takes comma-separated compute capabilities such as 80,90, got {args.targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        ap.error(f"--targets: {unknown or 'none'} not among {sorted(TARGETS)}")
    if args.workers is not None and args.workers < 1:
        ap.error("--workers must be at least 1")
    result = run(args.matrix, targets, args.workers)
    result["cuda"] = cuda_rows()
    failed = result["failures"] + sum(bool(r["problems"]) for r in result["cuda"]["rows"])
    from ..dist import atomic_write

    if args.json:
        atomic_write(args.json, lambda p: open(p, "w").write(json.dumps(result, indent=1, default=str)))
    if args.write_spills is not None:
        from . import _common

        path = args.write_spills or _common.SPILLS_FILE
        existing = json.load(open(path)) if os.path.exists(path) else None
        doc = spill_doc(result["rows"], existing)
        atomic_write(path, lambda p: open(p, "w").write(json.dumps(doc, indent=1, sort_keys=True) + "\n"))
        print(f"spill table: {path}")
    print(summary(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

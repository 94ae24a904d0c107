"""What the Triton kernels share: shared-memory budgets and estimates, config pruning, fixed configs.

Why estimate shared memory ourselves: an autotune config whose pipelined tiles exceed the device's
per-block shared memory fails to compile with ``OutOfResources`` (seen on an H100 and an H200: 245,760 bytes asked
for local_weight per-row in bf16, against 232,448). Each kernel states its footprint as
``stages × (bytes of the operand tiles loaded per K step) + bytes of epilogue operands``, which is what
Triton's software pipeliner allocates. :func:`tuned` builds each autotuner from the configs that fit the device
(Triton's own ``max_shared_mem``), so no config over the budget ever reaches the autotuner: an
``early_config_prune`` hook alone was not enough (the H200 still met the config above under autotuning).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import torch
import triton

from .._env import autotune, fixed_configs, triton_interpreting

# Per-block shared memory a kernel may opt into (bytes).
HOPPER_SMEM = 227 * 1024  # H100 / H200 (sm_90)
CONSUMER_SMEM = 99 * 1024  # Ada and consumer Ampere (sm_86, sm_89)


@functools.lru_cache(maxsize=None)
def smem_budget(device_index: int) -> int:
    """The shared memory a block of CUDA device ``device_index`` may use (bytes): the figure Triton itself checks
    ("Hardware limit" in its OutOfResources), else torch's opt-in figure, else the smaller consumer budget."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        if props.get("max_shared_mem"):
            return int(props["max_shared_mem"])
    except Exception:  # pragma: no cover - depends on the driver
        pass
    props = torch.cuda.get_device_properties(device_index)
    for name in ("shared_memory_per_block_optin", "max_shared_memory_per_block_optin"):
        if getattr(props, name, 0):
            return int(getattr(props, name))
    return CONSUMER_SMEM  # the smaller budget when neither says: every config kept then fits anywhere


def config_meta(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_stages": cfg.num_stages, "num_warps": cfg.num_warps}


def fits(configs: Sequence[triton.Config], footprint: Callable[[dict], int], budget: int) -> list[triton.Config]:
    """The configs whose estimated shared memory fits ``budget``; never empty (the smallest one stays, so a
    launch on a tiny device fails loudly in Triton rather than with an empty autotune list)."""
    sized = [(footprint(config_meta(c)), c) for c in configs]
    keep = [c for need, c in sized if need <= budget]
    return keep or [min(sized, key=lambda s: s[0])[1]]


_TUNERS: dict = {}


# Configs that spill registers, per target, kernel and launch variant, as python -m fastsplit.kernels.check_targets
# --write-spills measured them (ptxas's "bytes spill stores"): a launch on a device of that target skips them.
SPILLS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spills.json")
SPILLS_FORMAT = "fastsplit.spills/1"


@functools.lru_cache(maxsize=1)
def spill_table() -> dict:
    """{(target, kernel, variant key): {config index: spilled bytes}} from SPILLS_FILE; empty without one. A file
    of another format is an error naming it (the table is generated, never hand-edited)."""
    try:
        with open(SPILLS_FILE) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    if not isinstance(doc, dict) or doc.get("format") != SPILLS_FORMAT:
        raise ValueError(f"{SPILLS_FILE} is not a {SPILLS_FORMAT} table: regenerate it with "
                         f"python -m fastsplit.kernels.check_targets --write-spills")
    table = {}
    for target, kernels in doc["spills"].items():
        for kernel, variants in kernels.items():
            for variant, configs in variants.items():
                table[(target, kernel, variant)] = {int(i): int(b) for i, b in configs.items()}
    return table


@functools.lru_cache(maxsize=None)
def device_target(device_index: int) -> str:
    """``sm_<major><minor>`` of CUDA device ``device_index`` (the spill table's targets)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=4096)
def spilled(target: str, kernel: str, variant: str) -> dict:
    """{config index: spilled bytes} of ``kernel``'s configs that spill on ``target`` at ``variant``."""
    return spill_table().get((target, kernel, variant), {})


def without_spills(configs: Sequence[triton.Config], footprint: Callable[[dict], int], budget: int,
                   spills: dict) -> list[int]:
    """Indices of the configs that fit ``budget`` and are not known to spill (``spills``: {index: bytes}), in
    preference order; where every config that fits spills, the one that spills least (a config that spills still
    beats one that does not fit)."""
    fit = [i for i, c in enumerate(configs) if footprint(config_meta(c)) <= budget]
    clean = [i for i in fit if i not in spills]
    return clean or sorted(fit, key=lambda i: spills[i])[:1]


def tuned(kernel, configs: Callable[[], list], footprint: Callable[[dict], int], device: torch.device, *,
          key: list[str], fixed: triton.Config, interpret: triton.Config, drop: dict | None = None):
    """What to launch for ``kernel`` (a ``triton.jit`` function) on ``device``: ``(launchable, meta)``.

    * Under the interpreter: the kernel itself and ``interpret``'s block sizes.
    * With ``FASTSPLIT_FIXED_CONFIGS=1`` (the test suite): the kernel and ``fixed`` (block sizes, warps, stages).
    * By default: the kernel and the first config of ``configs()`` (ordered by preference) whose ``footprint``
      fits the device's budget, skipping the configs of ``drop`` ({index: bytes}: they spill registers there;
      :func:`without_spills`).
    * With ``FASTSPLIT_AUTOTUNE=1``: an autotuner over exactly the fitting configs, built once per (kernel,
      budget, footprints) and cached; ``meta`` is empty.
    A config over the budget never reaches a launch or the autotuner.
    """
    if triton_interpreting() or device.type != "cuda":
        return kernel, dict(interpret.kwargs)
    if fixed_configs():
        return kernel, config_launch_meta(fixed)
    budget = smem_budget(device.index if device.index is not None else torch.cuda.current_device())
    space = configs()
    if drop:
        space = [space[i] for i in without_spills(space, footprint, budget, drop)] or space
    if not autotune():  # the default: one compile per variant, the same config every run
        return kernel, config_launch_meta(fits(space, footprint, budget)[0])
    needs = tuple(footprint(config_meta(c)) for c in space)
    cache_key = (kernel, budget, needs)
    if cache_key not in _TUNERS:
        _TUNERS[cache_key] = triton.autotune(configs=fits(space, footprint, budget), key=key)(kernel)
    return _TUNERS[cache_key], {}


def config_launch_meta(cfg: triton.Config) -> dict:
    """A config as launch keywords: its block sizes, warps and stages."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}



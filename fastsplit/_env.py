"""Process-wide switches, read by every layer; this module imports nothing from fastsplit.

* ``FASTSPLIT_DEBUG=1`` (read at import) or :func:`set_debug`: the ops also check the *values* of CUDA tensors
  (NaN/inf multipliers, out-of-range targets, a pair row without targets). Those checks read device data, so
  they synchronise with the host; off by default, so no hot path synchronises. On CPU tensors the value checks
  cost no sync and always run; shape, dtype and device checks read only metadata and always run.
* ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through Triton's interpreter (tests only).
* ``FASTSPLIT_FIXED_CONFIGS=1``: every Triton kernel takes one small fixed launch config (the test suite sets
  it: one compile per kernel variant, a config that fits every device).
* ``FASTSPLIT_AUTOTUNE=1``: the decode kernel benchmarks every config that fits the device on the first call of
  each shape, instead of taking the first fitting one of its preference-ordered list (the default).
* ``FASTSPLIT_TUNE``: whether ``backend="auto"`` measures its candidates on the device (``fastsplit.ops.tune``).
  Unset: on CUDA devices yes, on the CPU no; ``1``: everywhere; ``0``: nowhere (the static table and defaults
  decide). Read at import; :func:`set_tuning` overrides it for the process.
* ``FASTSPLIT_CACHE``: the cache folder (default ``$XDG_CACHE_HOME/fastsplit``, else ``~/.cache/fastsplit``): the
  dequantised default model and the tuner's measurements.
"""
from __future__ import annotations

import os

def _from_environment() -> bool:
    return os.environ.get("FASTSPLIT_DEBUG", "0") == "1"


_debug: bool = _from_environment()  # read once: every op call asks, and os.environ costs half a µs


def debug() -> bool:
    """Whether the value checks that synchronise with the host are on (see the module docstring)."""
    return _debug


def set_debug(enabled: bool | None) -> None:
    """Turn the value checks on or off for this process; ``None`` defers to ``FASTSPLIT_DEBUG`` again.

    Example::

        >>> fastsplit.set_debug(True)      # while hunting a NaN; costs a host sync per checked tensor
    """
    global _debug
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _debug = _from_environment() if enabled is None else enabled


def _tune_from_environment() -> bool | None:
    value = os.environ.get("FASTSPLIT_TUNE", "").strip()
    return None if value == "" else value != "0"


_tune: bool | None = _tune_from_environment()


def tuning(device_type: str) -> bool:
    """Whether ``backend="auto"`` may tune on a device of ``device_type`` ("cuda", "cpu"): FASTSPLIT_TUNE or
    :func:`set_tuning` when set, else on CUDA only."""
    return _tune if _tune is not None else device_type == "cuda"


def set_tuning(enabled: bool | None) -> None:
    """Turn ``backend="auto"``'s measurements on (every device) or off (the static defaults decide) for this process;
    ``None`` defers to ``FASTSPLIT_TUNE`` again (unset: CUDA devices only).

    Example::

        >>> fastsplit.set_tuning(True)     # also measure the CPU's candidates (fold or not, chunk sizes)
    """
    global _tune
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _tune = _tune_from_environment() if enabled is None else enabled


def cache_root() -> str:
    """fastsplit's cache folder: ``$FASTSPLIT_CACHE``, else ``$XDG_CACHE_HOME/fastsplit``, else ``~/.cache/fastsplit``."""
    return os.environ.get("FASTSPLIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastsplit")


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune() -> bool:
    """True when the Triton kernels autotune over their fitting configs (``FASTSPLIT_AUTOTUNE=1``)."""
    return os.environ.get("FASTSPLIT_AUTOTUNE", "0") == "1"


def fixed_configs() -> bool:
    """True when Triton kernels take one small fixed config (``FASTSPLIT_FIXED_CONFIGS=1``)."""
    return os.environ.get("FASTSPLIT_FIXED_CONFIGS", "0") == "1"

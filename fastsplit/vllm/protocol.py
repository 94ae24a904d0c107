"""The steering request protocol of the vLLM plugin: the names, keys, salts and checks that the front end, the engine
core and the workers all read. A leaf: it imports neither vLLM nor the rest of ``fastsplit.vllm``.

Registration (the environment of the process that starts vLLM)::

    FASTSPLIT_VLLM_STEERING="optimism=run/steering.safetensors,calm=run2/steering.safetensors"
    FASTSPLIT_VLLM_MAX_M=1000          # optional: the largest |m| a request may ask for (default 1000)

A request: ``extra_args={"fastsplit_steering": "optimism", "fastsplit_m": 4.0}`` (``vllm_xargs`` over HTTP). A
request that names no steering and no strength is unsteered; one that names a steering without a strength runs it
at m = 1; with one steering registered the name may be left out.
"""
from __future__ import annotations

import functools
import math
import os

ENV = "FASTSPLIT_VLLM_STEERING"
ENV_MAX_M = "FASTSPLIT_VLLM_MAX_M"
KEY_STEERING = "fastsplit_steering"
KEY_M = "fastsplit_m"
DEFAULT_MAX_M = 1000.0  # |m| past a few hundred flattens every distribution: a typo, not a sweep

__all__ = ["ENV", "ENV_MAX_M", "KEY_STEERING", "KEY_M", "DEFAULT_MAX_M", "registry", "max_m", "request_steering",
           "steering_salt"]


@functools.lru_cache(maxsize=None)
def _parse(spec: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "default", item
        name, path = name.strip(), os.path.abspath(os.path.expanduser(path.strip()))
        if not name or any(n == name for n, _ in out):
            raise ValueError(f"{ENV}: each steering needs a name of its own (name=path), got {item!r}")
        out.append((name, path))
    return tuple(out)


def registry() -> dict[str, str]:
    """The steering files registered through ``FASTSPLIT_VLLM_STEERING`` (``name=path,...``; a bare path is named
    "default"), as {name: absolute path}; empty without the variable."""
    return dict(_parse(os.environ.get(ENV, "")))


def max_m() -> float:
    """The largest |m| a request may ask for: ``FASTSPLIT_VLLM_MAX_M``, default :data:`DEFAULT_MAX_M`."""
    raw = os.environ.get(ENV_MAX_M, "")
    if not raw:
        return DEFAULT_MAX_M
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{ENV_MAX_M} must be a positive number, got {raw!r}")
    return value


def request_steering(extra_args, names) -> tuple[str | None, float]:
    """(steering name, m) a request asks for through its ``extra_args``; (None, 0.0) for an unsteered one.

    A name not among ``names``, a strength that is not a finite number (booleans included: JSON ``true`` is not a
    strength), or one past ``FASTSPLIT_VLLM_MAX_M`` in size, is a ValueError saying so.

    Example::

        >>> request_steering({"fastsplit_steering": "opt", "fastsplit_m": 4}, ["opt"])
        ('opt', 4.0)
    """
    if not extra_args or (KEY_STEERING not in extra_args and KEY_M not in extra_args):
        return None, 0.0
    names = list(names)
    m = extra_args.get(KEY_M, 1.0 if KEY_STEERING in extra_args else 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"{KEY_M} must be a finite number, got {m!r}")
    bound = max_m()
    if abs(m) > bound:
        raise ValueError(f"{KEY_M}={m!r} is past the server's bound |m| <= {bound:g} (set {ENV_MAX_M} to allow more)")
    name = extra_args.get(KEY_STEERING)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"{KEY_M} without {KEY_STEERING}: name one of the registered steerings {names}")
        name = names[0]
    if name not in names:
        raise ValueError(f"{KEY_STEERING}={name!r} is not registered (registered: {names or 'none'}; register steering "
                         f"files with {ENV}=name=path,...)")
    return name, float(m)


def steering_salt(extra_args, names) -> str | None:
    """The cache salt of a steered request (its steering and strength), or None for an unsteered one (m = 0)."""
    try:
        name, m = request_steering(extra_args, names)
    except ValueError:
        return None
    return None if name is None or m == 0 else f"fastsplit:{name}:{m!r}"

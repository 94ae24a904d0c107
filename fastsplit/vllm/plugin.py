"""The vLLM plugin: per-request steering inside a vLLM engine (entry point ``vllm.general_plugins``).

Steering files are registered when the engine starts, through the environment of the process that starts it:

    FASTSPLIT_VLLM_STEERING="optimism=run/steering.safetensors,calm=run2/steering.safetensors" vllm serve MODEL

and a request picks one, and its strength, in ``SamplingParams(extra_args={"fastsplit_steering": "optimism",
"fastsplit_m": 4.0})`` (through the OpenAI-compatible server: ``"vllm_xargs": {...}`` in the request body). With one
steering registered the name may be left out; without ``fastsplit_m`` (or at 0) a request is unsteered.

How it runs, in each process vLLM starts (the plugin is loaded in all of them, and does nothing without the
variable):

* **Front end**: a request naming an unknown steering or a strength that is not a finite number is refused when
  its ``SamplingParams`` are made (a 400 from the server), before it reaches the engine.
* **Engine core**: a steered request's cache salt names its steering and strength, so the prefix cache never serves
  it KV computed under another steering or strength (m = 0 shares the unsteered cache: it is the base model).
* **Workers**: after the model loads, each steered layer's ``mlp.down_proj`` becomes a module that calls
  :func:`fastsplit.steered_linear` with a **per-token m** read from a persistent buffer (one per steering, as long as
  the largest batch); before every step the runner's batch layout (request order, ``query_start_loc``) and each
  request's ``extra_args`` fill it. Requests with different steerings and strengths share a batch, and
  ``torch.compile`` and CUDA graphs see a tensor, never a Python float (a float would be frozen at trace time).

Every vLLM internal it relies on is listed in :mod:`fastsplit.vllm.internals`; one that moved stops the engine's
start with one line naming the version and the internal.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import os

log = logging.getLogger("fastsplit")

ENV = "FASTSPLIT_VLLM_STEERING"
KEY_STEERING = "fastsplit_steering"
KEY_M = "fastsplit_m"

__all__ = ["register", "registry", "request_steering", "steering_salt", "ENV", "KEY_STEERING", "KEY_M"]


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


def request_steering(extra_args, names) -> tuple[str | None, float]:
    """(steering name, m) a request asks for through its ``extra_args``; (None, 0.0) for an unsteered one. A name
    not among ``names``, or a strength that is not a finite number, is a ValueError saying so."""
    if not extra_args or (KEY_STEERING not in extra_args and KEY_M not in extra_args):
        return None, 0.0
    names = list(names)
    m = extra_args.get(KEY_M, 1.0 if KEY_STEERING in extra_args else 0.0)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"{KEY_M} must be a finite number, got {m!r}")
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


def register() -> None:
    """The ``vllm.general_plugins`` entry point: installs the steering hooks in this vLLM process when
    ``FASTSPLIT_VLLM_STEERING`` names steering files (and does nothing otherwise)."""
    reg = registry()
    if not reg:
        return
    from .. import steerfile

    for name, path in reg.items():  # every process checks the files: a bad one stops the start, in one line
        meta = steerfile.read_metadata(path)
        if meta["site"] != "down_proj":
            raise ValueError(f"{ENV}: {name}={path} steers the residual site; the vLLM plugin steers an MLP's down_proj "
                             "(train with --site down_proj)")
    _patch_requests(reg)
    patch_front_end()
    _patch_runners(reg)


def patch_front_end() -> None:
    """Check requests' steering keys when their ``SamplingParams`` are made, against the steering registered *now*
    (``FASTSPLIT_VLLM_STEERING`` is read at each check: a process may start several engines). The plugin does this
    at vLLM's start when steering is registered; :class:`fastsplit.vllm.Engine` also does it for its own process."""
    _patch_sampling_params()


def _patch_sampling_params() -> None:
    from vllm.sampling_params import SamplingParams

    from .internals import moved

    orig = getattr(SamplingParams, "_verify_args", None)
    if orig is None:
        raise moved("SamplingParams._verify_args")
    if getattr(orig, "_fastsplit", False):
        return
    try:
        from vllm.exceptions import VLLMValidationError as Invalid
    except ImportError:  # pragma: no cover - older vLLM
        Invalid = ValueError

    def _verify_args(self):
        orig(self)
        extra = self.extra_args
        if extra and (KEY_STEERING in extra or KEY_M in extra):
            try:
                request_steering(extra, registry())
            except ValueError as exc:
                raise Invalid(str(exc)) from None
    _verify_args._fastsplit = True
    SamplingParams._verify_args = _verify_args


def _patch_requests(reg) -> None:
    from vllm.v1.request import Request

    from .internals import moved

    orig = Request.__init__
    if getattr(orig, "_fastsplit", False):
        return
    sig = inspect.signature(orig)
    if "sampling_params" not in sig.parameters or "cache_salt" not in sig.parameters:
        raise moved("Request.__init__(sampling_params=..., cache_salt=...)")

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        sp = bound.arguments.get("sampling_params")
        salt = steering_salt(getattr(sp, "extra_args", None), reg)
        if salt:
            old = bound.arguments.get("cache_salt")
            bound.arguments["cache_salt"] = salt if not old else f"{old}|{salt}"
        orig(*bound.args, **bound.kwargs)
    __init__._fastsplit = True
    Request.__init__ = __init__


def _patch_runners(reg) -> None:
    from .internals import moved

    classes = []
    for mod, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                      ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            classes.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    if not classes:
        raise moved("vllm.v1.worker.gpu_model_runner.GPUModelRunner")
    for cls in classes:
        orig = cls.__dict__.get("load_model")
        if orig is None or getattr(orig, "_fastsplit", False):
            continue

        def load_model(self, *args, _orig=orig, **kwargs):
            out = _orig(self, *args, **kwargs)
            from .worker import install

            install(self, reg)
            return out
        load_model._fastsplit = True
        cls.load_model = load_model

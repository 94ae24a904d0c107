"""The vLLM plugin: per-request steering inside a vLLM engine (entry point ``vllm.general_plugins``).

Steering files are registered when the engine starts, through the environment of the process that starts it:

    FASTSPLIT_VLLM_STEERING="optimism=run/steering.safetensors,calm=run2/steering.safetensors" vllm serve MODEL

and a request picks one, and its strength, in ``SamplingParams(extra_args={"fastsplit_steering": "optimism",
"fastsplit_m": 4.0})`` (through the OpenAI-compatible server: ``"vllm_xargs": {...}`` in the request body). A
request that names neither key, or asks for m = 0, is unsteered; one that names a steering without ``fastsplit_m``
runs it at m = 1; with one steering registered the name may be left out. |m| is bounded by
``FASTSPLIT_VLLM_MAX_M`` (default 1000; past it, a 400). The protocol is :mod:`fastsplit.vllm.protocol`.

How it runs, in each process vLLM starts (the plugin is loaded in all of them, and does nothing without the
variable):

* **Front end**: a request naming an unknown steering or a strength that is not a finite number (or past the bound)
  is refused when its ``SamplingParams`` are made (a 400 from the server), before it reaches the engine.
* **Engine core**: a steered request's cache salt names its steering and strength, so the prefix cache never serves
  it KV computed under another steering or strength (m = 0 shares the unsteered cache: it is the base model). At its
  start every worker reports the steerings it installed (``collective_rpc``): one installed nowhere (a model runner
  this plugin does not know) stops the start, so the engine fails closed, never serving an unsteered model.
* **Workers**: after the model loads, each steered layer's ``mlp.down_proj`` becomes a module that calls
  :func:`fastsplit.steered_linear` with a **per-token m** read from a persistent buffer (one per steering, as long as
  the largest batch); before every step the runner's batch layout (request order, ``query_start_loc``) and each
  request's ``extra_args`` fill it (Model Runner V1 and V2: :mod:`fastsplit.vllm.worker`). Requests with different
  steerings and strengths share a batch, and ``torch.compile`` and CUDA graphs see a tensor, never a Python float (a
  float would be frozen at trace time).

Every vLLM internal it relies on is listed in :mod:`fastsplit.vllm.internals`; one that moved stops the engine's
start with one line naming the version and the internal.
"""
from __future__ import annotations

import functools
import inspect
import logging

from . import protocol
from .protocol import ENV, KEY_M, KEY_STEERING, registry, request_steering, steering_salt

log = logging.getLogger("fastsplit")

__all__ = ["register", "registry", "request_steering", "steering_salt", "ENV", "KEY_STEERING", "KEY_M",
           "installed_steerings", "patch_front_end"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: installs the steering hooks in this vLLM process when
    ``FASTSPLIT_VLLM_STEERING`` names steering files (and does nothing otherwise)."""
    reg = registry()
    if not reg:
        return
    from .. import steerfile
    from .internals import warn_untested

    protocol.max_m()  # a bad FASTSPLIT_VLLM_MAX_M stops the start, not the first request
    for name, path in reg.items():  # every process checks the files: a bad one stops the start, in one line
        meta = steerfile.read_metadata(path)
        if meta["site"] != "down_proj":
            raise ValueError(f"{ENV}: {name}={path} steers the residual site; the vLLM plugin steers an MLP's down_proj "
                             "(train with --site down_proj)")
    warn_untested()
    _patch_requests(reg)
    patch_front_end()
    _patch_runners(reg)
    _patch_engine_core(reg)


def patch_front_end() -> None:
    """Check requests' steering keys when their ``SamplingParams`` are made, against the steering registered *now*
    (``FASTSPLIT_VLLM_STEERING`` is read at each check: a process may start several engines), and keep a JSON
    ``true`` a boolean in the OpenAI server's ``vllm_xargs`` (pydantic would make it 1, a strength). The plugin
    does this at vLLM's start when steering is registered; :class:`fastsplit.vllm.Engine` also does it for its own
    process."""
    _patch_sampling_params()
    _patch_xargs()


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


def _patch_xargs() -> None:
    """The OpenAI server's requests type ``vllm_xargs`` as ``dict[str, str | int | float | list[...]]``: pydantic's
    lax mode turns JSON ``true`` into the int 1, which would pass as m = 1. A strict bool first in the union keeps it
    a bool, which the strength check refuses (a 400). Only classes that have the field and the union as listed in
    ``internals.XARGS_MODELS`` are touched; the others are left as they are (the check still refuses every
    non-number but that coerced ``true``)."""
    import importlib
    import typing

    from pydantic import StrictBool

    from .internals import XARGS_MODELS

    for mod, name in XARGS_MODELS:
        try:
            cls = getattr(importlib.import_module(mod), name)
        except Exception:  # an entry point this vLLM lacks (or that fails to import here): nothing to keep strict
            continue
        field = cls.model_fields.get("vllm_xargs")
        if field is None or getattr(cls, "_fastsplit_xargs", False):
            continue
        value = typing.get_args(typing.get_args(field.annotation)[0])  # dict[str, V] | None -> V's members
        if len(value) != 2:
            continue
        members = typing.get_args(value[1])
        if not members or StrictBool in members:
            continue
        field.annotation = dict[str, typing.Union[(StrictBool, *members)]] | None
        cls.model_rebuild(force=True)
        cls._fastsplit_xargs = True


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
    """Wrap ``load_model`` of every model runner class listed in ``internals.RUNNERS`` that this vLLM has (V1 and
    V2, GPU and CPU): the steered layers are installed after the model loads. Which runner actually runs is checked
    at the engine core's start (:func:`_patch_engine_core`), so a runner class that is not listed fails closed."""
    from .internals import RUNNERS, moved

    found = 0
    for mod, name, kind in RUNNERS:
        try:
            cls = getattr(__import__(mod, fromlist=[name]), name)
        except Exception:  # not in this vLLM, or not importable on this platform: the start check has the last word
            continue
        found += 1
        orig = cls.__dict__.get("load_model")
        if orig is None or getattr(orig, "_fastsplit", False):
            continue  # inherited from a listed class, which is wrapped

        def load_model(self, *args, _orig=orig, _kind=kind, **kwargs):
            out = _orig(self, *args, **kwargs)
            from .worker import install

            install(self, reg, kind=_kind)
            return out
        load_model._fastsplit = True
        cls.load_model = load_model
    if not found:
        raise moved("a model runner class of internals.RUNNERS")


def installed_steerings(worker) -> dict:
    """A worker's report (run in each worker through vLLM's ``collective_rpc``): its model runner's class and the
    steerings installed in it, ``{"runner": "module.Class", "steerings": {name: layer}}``."""
    runner = getattr(worker, "model_runner", None)
    state = getattr(runner, "_fastsplit_state", None)
    cls = type(runner)
    return {"runner": f"{cls.__module__}.{cls.__qualname__}",
            "steerings": dict(state.layers) if state is not None else {}}


def check_installed(reports: list[dict], reg: dict) -> None:
    """Fail closed: a registered steering that no worker installed stops the start, in one line naming the vLLM
    version and the runner classes (e.g. a runner class this plugin does not know, whose ``load_model`` it never
    wrapped)."""
    from .internals import vllm_version

    missing = [n for n in reg if not any(n in r.get("steerings", {}) for r in reports)]
    if missing:
        runners = sorted({r.get("runner", "?") for r in reports}) or ["no worker answered"]
        raise RuntimeError(f"fastsplit's vLLM plugin: the steering {', '.join(missing)} was installed in no worker "
                           f"(vLLM {vllm_version()}, model runner {', '.join(runners)}; fastsplit/vllm/internals.py "
                           f"RUNNERS lists the runners it steers): refusing to serve an unsteered model")


def _patch_engine_core(reg) -> None:
    """Wrap ``EngineCore._initialize_kv_caches``, which the engine core calls once its workers have loaded the model
    (and after it loaded this plugin: wrapping its ``__init__`` would come too late in a spawned engine core): ask
    each worker which steerings it installed (:func:`installed_steerings` through ``collective_rpc``) and refuse to
    start if one is installed nowhere. Logs one line naming the steerings served."""
    from .internals import moved

    try:
        from vllm.v1.engine.core import EngineCore
    except ImportError:
        raise moved("vllm.v1.engine.core.EngineCore") from None
    orig = getattr(EngineCore, "_initialize_kv_caches", None)
    if orig is None or not hasattr(EngineCore, "collective_rpc"):
        raise moved("EngineCore._initialize_kv_caches / collective_rpc")
    if getattr(orig, "_fastsplit", False):
        return

    @functools.wraps(orig)
    def _initialize_kv_caches(self, *args, **kwargs):
        reports = self.collective_rpc(installed_steerings)
        check_installed(reports, reg)
        layers = {n: sorted({r["steerings"][n] for r in reports if n in r["steerings"]}) for n in reg}
        log.warning("fastsplit: serving steering %s (model runner %s)",
                    ", ".join(f"{n}={reg[n]} at layer {','.join(map(str, layers[n]))}" for n in reg),
                    ", ".join(sorted({r["runner"] for r in reports})))
        return orig(self, *args, **kwargs)
    _initialize_kv_caches._fastsplit = True
    EngineCore._initialize_kv_caches = _initialize_kv_caches

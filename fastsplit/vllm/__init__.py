"""fastsplit on vLLM: the only code that knows vLLM's internals (``internals.py`` lists them, with the versions
tested), as ``fastsplit.hf`` is for transformers.

* :mod:`~fastsplit.vllm.protocol`: the request protocol (names, keys, salts, checks), a leaf. Register steering
  files with ``FASTSPLIT_VLLM_STEERING=name=path,...`` when the engine starts; a request picks one and its strength
  with ``extra_args={"fastsplit_steering": name, "fastsplit_m": m}`` (``vllm_xargs`` through the OpenAI server).
* :mod:`~fastsplit.vllm.plugin`: the ``vllm.general_plugins`` entry point, which patches vLLM (and fails closed);
  :mod:`~fastsplit.vllm.worker`: the steered modules and the per-token strength buffers in each worker.
* :class:`~fastsplit.vllm.engine.Engine`: an engine with steering registered, for log-odds and generation sweeps
  (behind :class:`fastsplit.engines.VLLMEngine`: ``fastsplit sweep --engine vllm``, ``fastsplit generate --engine
  vllm``).

Importing this package does not import vLLM.
"""
from .plugin import register
from .protocol import ENV, KEY_M, KEY_STEERING, registry, request_steering, steering_salt

__all__ = ["ENV", "KEY_M", "KEY_STEERING", "register", "registry", "request_steering", "steering_salt", "Engine"]


def __getattr__(name):
    if name == "Engine":  # vLLM-free until used
        from .engine import Engine

        return Engine
    raise AttributeError(name)

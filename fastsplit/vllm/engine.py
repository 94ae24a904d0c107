"""A vLLM engine with fastsplit steering registered: scoring completions (log-odds sweeps) and generating at many
strengths, every strength a concurrent request. vLLM's public API only (``LLM``, ``SamplingParams``, token prompts);
the steering itself is the plugin's (:mod:`fastsplit.vllm.plugin`).

Example::

    >>> engine = Engine("my-model-folder", {"optimism": "run/steering.safetensors"}, dtype="float32",
    ...                 enforce_eager=True)
    >>> nll = engine.score([(prompt_ids, completion_ids)], [-4, 0, 4], steering="optimism")   # [rows, 3]
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from .protocol import ENV, KEY_M, KEY_STEERING

__all__ = ["Engine"]


def _check_entry_point() -> None:
    """vLLM finds the plugin through the ``vllm.general_plugins`` entry point of the installed fastsplit; stale
    install metadata (an old ``fastsplit.egg-info`` on the path) would hide it and leave the engine unsteered."""
    from importlib.metadata import entry_points

    values = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "fastsplit"]
    if "fastsplit.vllm.plugin:register" not in values:
        raise RuntimeError("vLLM would not load fastsplit's plugin: no 'fastsplit' entry point in the group "
                           "vllm.general_plugins (stale install metadata, e.g. an old fastsplit.egg-info on the path? "
                           "reinstall fastsplit: pip install -e .)")


class Engine:
    """``vllm.LLM(model, **llm_kwargs)`` started with the steering files ``steerings`` ({name: path}) registered.

    The registration goes through ``FASTSPLIT_VLLM_STEERING`` in this process's environment, which the engine's
    processes inherit; it is set for the engine's start (and left set while the engine lives, as vLLM may start
    workers later). ``llm_kwargs`` pass through to vLLM: ``tensor_parallel_size``, ``data_parallel_size``,
    ``dtype``, ``enforce_eager``, ``enable_prefix_caching``, ..."""

    def __init__(self, model: str, steerings: dict[str, str] | None = None, **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(f"the vLLM engine needs vLLM (pip install 'fastsplit[vllm]' on a CPU machine, vLLM "
                               f"itself on a GPU one): {exc}") from None
        steerings = dict(steerings or {})
        if steerings:
            _check_entry_point()
        for name, path in steerings.items():
            if "," in name or "=" in name or "," in path:
                raise ValueError(f"steering names and paths may not hold ',' or '=': {name}={path}")
        if steerings:
            os.environ[ENV] = ",".join(f"{n}={os.path.abspath(p)}" for n, p in steerings.items())
        else:
            os.environ.pop(ENV, None)
        from .plugin import patch_front_end

        patch_front_end()  # this process may have loaded vLLM's plugins before the steering was registered
        self.steerings = steerings
        self.llm = LLM(model=model, **llm_kwargs)
        if steerings:
            self.self_test()

    def self_test(self) -> None:
        """Score one short token prompt at m = 0 and at the first registered steering's m = 1; equal scores mean the
        engine does not steer (a runner the plugin missed, a zero steering file), and the engine refuses to serve.
        The engine core's start check (every registered steering installed in some worker) runs before this."""
        from .internals import vllm_version

        name = next(iter(self.steerings))
        nll = self.score([([0, 1, 2, 3], [4, 5])], [0.0, 1.0], steering=name, progress=False)[0]
        if nll[0] == nll[1]:
            self.close()
            raise RuntimeError(f"fastsplit's vLLM engine: steering {name!r} at m = 1 scores exactly as m = 0 (NLL "
                               f"{nll[0]!r}): vLLM {vllm_version()} is not steered (or the steering file is zero); "
                               "refusing to serve")

    def close(self) -> None:
        """Shut the engine down (its processes and memory); the object is unusable after."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm

    @staticmethod
    def extra_args(steering: str | None, m: float) -> dict:
        """The ``SamplingParams.extra_args`` (or the OpenAI server's ``vllm_xargs``) of a request at strength m."""
        if m == 0 or steering is None:
            return {}
        return {KEY_STEERING: steering, KEY_M: float(m)}

    def score(self, rows: Sequence[tuple[list[int], list[int]]], multipliers: Sequence[float], *,
              steering: str | None = None, length_norm: bool = False, progress: bool = True) -> np.ndarray:
        """Summed (or mean) NLL of each row's completion after its prompt, at every m: [rows, M]. One request per
        (row, m), all submitted together; log-probabilities from ``prompt_logprobs``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if steering is not None and steering not in self.steerings:
            raise ValueError(f"steering {steering!r} is not registered with this engine ({sorted(self.steerings)})")
        prompts, params, spans = [], [], []
        for m in multipliers:
            sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=self.extra_args(steering, m)
                                or None)
            for prompt, comp in rows:
                prompts.append(TokensPrompt(prompt_token_ids=list(prompt) + list(comp)))
                params.append(sp)
                spans.append((len(prompt), list(comp)))
        outs = self.llm.generate(prompts, params, use_tqdm=progress)
        nll = np.zeros(len(prompts))
        for k, (out, (start, comp)) in enumerate(zip(outs, spans)):
            total = 0.0
            for t, tok in enumerate(comp):
                entry = out.prompt_logprobs[start + t]
                total -= entry[tok].logprob
            nll[k] = total / len(comp) if length_norm else total
            if not math.isfinite(nll[k]):
                raise RuntimeError(f"vLLM returned a non-finite log-probability for row {k % len(rows)} at "
                                   f"m = {multipliers[k // len(rows)]}")
        return nll.reshape(len(multipliers), len(rows)).T

    def generate(self, prompts: Sequence[list[int]], multipliers: Sequence[float], *, steering: str | None = None,
                 max_new_tokens: int = 32, progress: bool = True, **sampling) -> list[list[str]]:
        """Greedy (or ``sampling``'s) continuations of each token-id prompt at every m: texts ``[prompt][m]``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs, params = [], []
        for p in prompts:
            for m in multipliers:
                reqs.append(TokensPrompt(prompt_token_ids=list(p)))
                params.append(SamplingParams(max_tokens=max_new_tokens, **({"temperature": 0.0} | sampling),
                                             skip_special_tokens=True,
                                             extra_args=self.extra_args(steering, m) or None))
        outs = self.llm.generate(reqs, params, use_tqdm=progress)
        M = len(multipliers)
        return [[outs[i * M + j].outputs[0].text for j in range(M)] for i in range(len(prompts))]

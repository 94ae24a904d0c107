"""Engines: one interface (:class:`Engine`) to whatever runs the model, so that every sweep, resume block and CLI
command is written once. :class:`TransformersEngine` runs fastsplit's fast paths on a Hugging Face model (this
process or ``torchrun``); :class:`VLLMEngine` runs a vLLM engine with the steering registered (importing this package
does not import vLLM).

Example::

    >>> engine = fastsplit.engines.TransformersEngine(model, tok, steering)
    >>> sweep = fastsplit.logodds_sweep(engine, test_pairs, [-4, 0, 4])
    >>> texts = fastsplit.generate_sweep(engine, ["Describe your week."], [-4, 0, 4])
"""
from __future__ import annotations

import warnings

from .base import Engine, refuse_hidden_states
from .transformers import TransformersEngine
from .vllm import VLLMEngine

__all__ = ["Engine", "TransformersEngine", "VLLMEngine", "resolve", "refuse_hidden_states", "deprecated"]


def resolve(first, args: tuple, n: int, what: str, *, group=None) -> tuple[Engine, tuple]:
    """The engine and the remaining positional arguments of a workflow called either as ``what(engine, *rest)`` or in
    the transformers form ``what(model, tokenizer, steering, *rest)``; ``n`` is how many ``rest`` arguments it
    takes."""
    if isinstance(first, Engine):
        if group is not None and not isinstance(first, TransformersEngine):
            raise ValueError(f"{what}: group= shares work over a process group on the transformers engine only "
                             f"(the {first.name} engine spreads with its own options)")
        if len(args) != n:
            raise TypeError(f"{what}(engine, ...) takes {n} positional arguments after the engine, got {len(args)}")
        return (TransformersEngine(first.model, first.tokenizer, first.steering, group=group)
                if group is not None else first), args
    if len(args) != n + 2:
        raise TypeError(f"{what} takes an engine (fastsplit.engines) or (model, tokenizer, steering) first, then {n} "
                        f"positional arguments")
    return TransformersEngine(first, args[0], args[1], group=group), args[2:]


def deprecated(old: str, new: str) -> None:
    """The one warning of a name kept for one release."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}", DeprecationWarning,
                  stacklevel=3)

"""Batched generation over many steering strengths: every (prompt, m) is a row with its own m, on any engine."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

from . import dist, engines
from .data import chat_prompt_ids
from .ops._checks import check_strengths

__all__ = ["generate_sweep", "generate_sweep_vllm"]


def generate_sweep(engine, *args, max_new_tokens: int = 32, do_sample: bool = False, batch_size: int | None = None,
                   chat: bool = True, progress: bool = True, group=None, checkpoint_dir: str | None = None,
                   resume: bool = False, **generate_kwargs) -> list[list[str]]:
    """Generate for every prompt at every multiplier; returns texts indexed ``[prompt][multiplier]``.

    Called as ``generate_sweep(engine, prompts, multipliers)`` with any engine (:mod:`fastsplit.engines`), or as
    ``generate_sweep(model, tokenizer, steering, prompts, multipliers)`` on a transformers model.

    Prompts are user messages under the chat template with ``add_generation_prompt=True`` (``chat=False``: plain
    text); outputs are the new tokens, decoded with ``skip_special_tokens=True``. On the transformers engine rows of
    many (prompt, m) are decoded together with per-row m and left padding (``batch_size`` rows per ``generate`` call;
    default all of them, at most 256), and greedy outputs equal running each m alone under
    ``steering.multiplier(m)``; on vLLM every (prompt, m) is one request.

    Inside an initialised process group (``torchrun``; or ``group=``) the transformers engine spreads the prompts
    over the ranks by their work and every rank returns all the texts, in the input order (:mod:`fastsplit.dist`).
    ``checkpoint_dir`` / ``resume``: finished prompts are kept there in blocks and a resumed sweep skips them
    (:class:`fastsplit.dist.Blocks`), as in :func:`fastsplit.logodds_sweep`, on either engine.

    Example::

        >>> texts = generate_sweep(model, tok, steering, ["Describe your week."], [-4, 0, 4], max_new_tokens=20)
        >>> texts[0][2]   # the first prompt at m = 4
    """
    engine, (prompts, multipliers) = engines.resolve(engine, args, 2, "generate_sweep", group=group)
    if not prompts:
        raise ValueError("prompts is empty")
    ms = check_strengths("multipliers", multipliers)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts = list(prompts)
    group = getattr(engine, "group", None)
    dist.check_world(len(prompts), "prompts", group)
    encoded = [chat_prompt_ids(engine.tokenizer, p, chat) for p in prompts]
    done, blocks = {}, None
    if checkpoint_dir:
        header = {"steering": engine.digest(), "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                  "multipliers": ms, "max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "chat": chat,
                  "generate_kwargs": repr(sorted(generate_kwargs.items()))}
        if engine.name != "transformers":
            header["engine"] = engine.name
        blocks = dist.Blocks(checkpoint_dir, header, "generation sweep", group)
        done = blocks.load() if resume else blocks.clear()
    todo = [i for i in range(len(prompts)) if i not in done]
    write = (lambda block: blocks.write({todo[k]: texts for k, texts in block.items()})) if blocks is not None else None
    new = engine.generate([encoded[i] for i in todo], ms, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          batch_size=batch_size, progress=progress, on_prompts=write,
                          **generate_kwargs) if todo else []
    texts = dict(zip(todo, new))
    return [done[i] if i in done else texts[i] for i in range(len(prompts))]


def generate_sweep_vllm(engine, tokenizer, prompts: Sequence[str], multipliers: Sequence[float], *,
                        steering: str | None = None, max_new_tokens: int = 32, chat: bool = True, progress: bool = True,
                        **sampling) -> list[list[str]]:
    """Deprecated: ``generate_sweep(fastsplit.engines.VLLMEngine(engine, tokenizer, steering), prompts,
    multipliers)``."""
    engines.deprecated("generate_sweep_vllm", "generate_sweep(fastsplit.engines.VLLMEngine(engine, tokenizer, "
                       "steering), prompts, multipliers)")
    return generate_sweep(engines.VLLMEngine(engine, tokenizer, steering), prompts, multipliers,
                          max_new_tokens=max_new_tokens, chat=chat, progress=progress, **sampling)

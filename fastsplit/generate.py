"""Batched generation over many steering strengths: every (prompt, m) is a row with its own m."""
from __future__ import annotations

from typing import Sequence

import torch

from . import dist, hf
from .data import chat_prompt_ids
from .ops._checks import check_strengths

__all__ = ["generate_sweep"]


def generate_sweep(model, tokenizer, steering: hf.Steering, prompts: Sequence[str], multipliers: Sequence[float], *,
                   max_new_tokens: int = 32, do_sample: bool = False, batch_size: int | None = None,
                   chat: bool = True, progress: bool = True, group=None, **generate_kwargs) -> list[list[str]]:
    """Generate for every prompt at every multiplier; returns texts indexed ``[prompt][multiplier]``.

    Prompts are user messages under the chat template with ``add_generation_prompt=True``; outputs are the
    new tokens, decoded with ``skip_special_tokens=True``. Rows of many (prompt, m) are decoded together
    with per-row m and left padding (``batch_size`` rows per ``generate`` call; default all of them, at
    most 256). Greedy outputs equal running each m alone under ``steering.multiplier(m)``.

    Inside an initialised process group (``torchrun``; or ``group=``) each rank generates for its contiguous
    shard of the prompts and every rank returns all the texts, in the input order (:mod:`fastsplit.dist`).

    Example::

        >>> texts = generate_sweep(model, tok, steering, ["Describe your week."], [-4, 0, 4], max_new_tokens=20)
        >>> texts[0][2]   # the first prompt at m = 4
    """
    if not prompts:
        raise ValueError("prompts is empty")
    ms = check_strengths("multipliers", multipliers)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    group = dist.active_group(group)
    dist.check_world(len(prompts), "prompts", group)
    part = dist.shard_range(len(prompts), group)
    mine = list(prompts)[part.start:part.stop]
    local = dist.agree(lambda: _generate(model, tokenizer, steering, mine, ms, max_new_tokens=max_new_tokens,
                                         do_sample=do_sample, batch_size=batch_size, chat=chat,
                                         progress=progress and dist.is_main(group), **generate_kwargs),
                       group, what="generation sweep")
    return dist.all_gather_list(local, group)


def _generate(model, tokenizer, steering, prompts, ms, *, max_new_tokens, do_sample, batch_size, chat, progress,
              **generate_kwargs) -> list[list[str]]:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = next(steering.module.parameters()).dtype
    encoded = [chat_prompt_ids(tokenizer, p, chat) for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(len(ms))]
    size = batch_size or min(len(rows), 256)
    pad = hf.pad_id_of(tokenizer)
    out: list[list[str]] = [[""] * len(ms) for _ in prompts]
    for s in tqdm(range(0, len(rows), size), desc="generate", disable=not progress, leave=False):
        chunk = rows[s:s + size]
        ids, mask = hf.pad_rows([encoded[i] for i, _ in chunk], pad, left=True)
        m = torch.tensor([ms[j] for _, j in chunk], device=device, dtype=dtype)
        with torch.no_grad(), steering.multiplier(m):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                 **generate_kwargs)
        texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        for (i, j), t in zip(chunk, texts):
            out[i][j] = t
    return out

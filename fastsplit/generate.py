"""Batched generation over many steering strengths: every (prompt, m) is a row with its own m."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch

from . import dist, hf
from .data import chat_prompt_ids
from .ops._checks import check_strengths

__all__ = ["generate_sweep", "generate_sweep_vllm"]


def generate_sweep(model, tokenizer, steering: hf.Steering, prompts: Sequence[str], multipliers: Sequence[float], *,
                   max_new_tokens: int = 32, do_sample: bool = False, batch_size: int | None = None,
                   chat: bool = True, progress: bool = True, group=None, checkpoint_dir: str | None = None,
                   resume: bool = False, **generate_kwargs) -> list[list[str]]:
    """Generate for every prompt at every multiplier; returns texts indexed ``[prompt][multiplier]``.

    Prompts are user messages under the chat template with ``add_generation_prompt=True``; outputs are the
    new tokens, decoded with ``skip_special_tokens=True``. Rows of many (prompt, m) are decoded together
    with per-row m and left padding (``batch_size`` rows per ``generate`` call; default all of them, at
    most 256). Greedy outputs equal running each m alone under ``steering.multiplier(m)``.

    Inside an initialised process group (``torchrun``; or ``group=``) the prompts are spread over the ranks by their
    work (prompt tokens plus new tokens) and every rank returns all the texts, in the input order
    (:mod:`fastsplit.dist`). ``checkpoint_dir`` / ``resume``: finished prompts are kept there in blocks and a resumed
    sweep skips them (:class:`fastsplit.dist.Blocks`), as in :func:`fastsplit.logodds_sweep`.

    Example::

        >>> texts = generate_sweep(model, tok, steering, ["Describe your week."], [-4, 0, 4], max_new_tokens=20)
        >>> texts[0][2]   # the first prompt at m = 4
    """
    if not prompts:
        raise ValueError("prompts is empty")
    ms = check_strengths("multipliers", multipliers)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts = list(prompts)
    group = dist.active_group(group)
    dist.check_world(len(prompts), "prompts", group)
    encoded = [chat_prompt_ids(tokenizer, p, chat) for p in prompts]
    done, blocks = {}, None
    if checkpoint_dir:
        header = {"steering": steering.digest(), "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                  "multipliers": ms, "max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "chat": chat,
                  "generate_kwargs": repr(sorted(generate_kwargs.items()))}
        blocks = dist.Blocks(checkpoint_dir, header, "generation sweep", group)
        done = blocks.load() if resume else blocks.clear()
    todo = [i for i in range(len(prompts)) if i not in done]
    mine = [todo[j] for j in dist.shard_by_work([len(encoded[i]) + max_new_tokens for i in todo], group)]
    write = (lambda texts: blocks.write(texts)) if blocks is not None else None
    local = dist.agree(lambda: _generate(model, tokenizer, steering, mine, encoded, ms, max_new_tokens=max_new_tokens,
                                         do_sample=do_sample, batch_size=batch_size,
                                         progress=progress and dist.is_main(group), on_block=write, **generate_kwargs),
                       group, what="generation sweep")
    return dist.gather_indexed({**(done if dist.is_main(group) else {}), **local}, len(prompts), group,
                               what="generation sweep")


def _generate(model, tokenizer, steering, mine, encoded, ms, *, max_new_tokens, do_sample, batch_size, progress,
              on_block=None, **generate_kwargs) -> dict:
    """{prompt index: [text per m]} for the prompts ``mine``; whole prompts per ``generate`` call (all their m), so
    each call's prompts form one finished block."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    dtype = next(steering.module.parameters()).dtype
    M = len(ms)
    size = max(1, (batch_size or min(len(mine) * M, 256)) // M)  # prompts per call
    pad = hf.pad_id_of(tokenizer)
    out: dict = {}
    for s in tqdm(range(0, len(mine), size), desc="generate", disable=not progress, leave=False):
        chunk = mine[s:s + size]
        rows = [(i, j) for i in chunk for j in range(M)]
        ids, mask = hf.pad_rows([encoded[i] for i, _ in rows], pad, left=True)
        m = torch.tensor([ms[j] for _, j in rows], device=device, dtype=dtype)
        with torch.no_grad(), steering.multiplier(m):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                 **generate_kwargs)
        texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        block = {i: texts[k * M:(k + 1) * M] for k, i in enumerate(chunk)}
        out.update(block)
        if on_block is not None:
            on_block(block)
    return out


def generate_sweep_vllm(engine, tokenizer, prompts: Sequence[str], multipliers: Sequence[float], *,
                        steering: str | None = None, max_new_tokens: int = 32, chat: bool = True, progress: bool = True,
                        **sampling) -> list[list[str]]:
    """:func:`generate_sweep` on a vLLM engine (:class:`fastsplit.vllm.Engine` with the steering registered as
    ``steering``): every (prompt, m) is one request, all submitted together; greedy unless ``sampling`` says
    otherwise. Texts ``[prompt][multiplier]``."""
    if not prompts:
        raise ValueError("prompts is empty")
    ms = check_strengths("multipliers", multipliers)
    encoded = [chat_prompt_ids(tokenizer, p, chat) for p in prompts]
    return engine.generate(encoded, ms, steering=steering, max_new_tokens=max_new_tokens, progress=progress,
                           **sampling)

"""Grouped-query attention without ``repeat_kv`` on the CPU, for the span of a sweep.

transformers' ``sdpa`` attention copies every key/value head once per query head it serves (``repeat_kv``)
whenever a mask is passed, which a padded batch always does; SDPA reads the shared heads itself with
``enable_gqa=True`` (torch >= 2.5), same numbers. On the CPU those copies are memory traffic in a compute-bound
sweep: SmolLM2-135M (9 query heads on 3 key/value heads), a 6-pair × 21 m sweep took 0.93× the time with SDPA's own
grouped-query attention (bench/RESULTS.md, fourteenth session). GPUs are left as they are: there SDPA's fused
kernels do not all take ``enable_gqa`` with a mask.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch.nn.functional as F
from torch import nn

from . import compat

NAME = "fastsplit_sdpa_gqa"  # the attention (and mask) interface entry; the model's own is restored after


def _forward(sdpa_attention_forward, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
             is_causal=None, **kwargs):
    """transformers' attention-function signature after the first argument (bound at registration: transformers'
    ``sdpa`` function): query [B, H, Tq, D], key/value [B, H_kv, Tk, D], a 4-D mask; returns ([B, Tq, H, D], None).
    Anything but a masked grouped-query call goes to transformers' ``sdpa``."""
    plain = (attention_mask is None or getattr(module, "num_key_value_groups", 1) <= 1 or query.device.type != "cpu"
             or key.shape[-1] != value.shape[-1] or any(kwargs.get(k) is not None for k in ("softcap", "position_bias",
                                                                                              "s_aux", "sinks")))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@functools.cache  # once per process (a call that raises is not cached: the next one tries again)
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # the fallback bound here, not imported in each call: _forward runs once per layer per pass
    AttentionInterface.register(NAME, functools.partial(_forward, sdpa_attention_forward))
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets


def applies(model: nn.Module) -> bool:
    """Whether :func:`gqa_attention` changes anything for ``model``: a CPU model on transformers' ``sdpa``
    attention whose layers share key/value heads between query heads."""
    cfg = model.config
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and device.type == "cpu" and bool(heads)
            and bool(kv) and heads > kv)


@contextlib.contextmanager
def gqa_attention(model: nn.Module) -> Iterator[bool]:
    """Within the block, a CPU model on ``sdpa`` attention with grouped-query heads runs SDPA's own grouped-query
    attention where transformers would copy keys and values per query head; after it, the model's attention is
    ``sdpa`` again (also after an error). Yields whether it switched: False, and nothing changed, for any other
    model, or (with one warning) a transformers without the attention interface. The numbers are the same either
    way (fp32: within 1e-6 on every tested architecture, ``tests/test_hf_attention.py``; a SmolLM2 sweep's NLLs
    bit for bit).

    The switch is the model's own (``set_attn_implementation``): another thread running the same model meanwhile
    runs this attention too, with the same results.

    Example::

        >>> with gqa_attention(model):
        ...     logits = model(input_ids=ids, attention_mask=mask).logits
    """
    if not applies(model):
        yield False
        return
    try:
        _register()
        model.set_attn_implementation(NAME)
    except (ImportError, AttributeError, ValueError, TypeError):
        compat.warn_fallback("the attention interface (AttentionInterface, set_attn_implementation)",
                             "attention copies keys and values per head as transformers does")
        yield False
        return
    try:
        yield model.config._attn_implementation == NAME
    finally:
        model.set_attn_implementation("sdpa")


__all__ = ["NAME", "applies", "gqa_attention"]

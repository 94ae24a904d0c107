"""KV-cache tricks for the log-odds sweep: a layer that only writes keys and values, cache-slot aliasing,
and whether the residual stream after the steered layer is affine in m. Internals used: ``internals.py``."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from torch import nn

from .compat import cache_from, warn_fallback
from .runner import decoder_layers

__all__ = ["keys_values_only", "alias_skipped", "affine_in_m", "new_cache", "repeat_rows", "window_shorter_than",
           "layer_states", "cache_of"]


_KNOWN = ("cache", "past_key_values", "position_embeddings")


class _KeysValuesOnly(nn.Module):
    """Stands in for a decoder layer whose output is not needed: writes the layer's keys and values to the
    KV cache (what later tokens attend to) and skips its queries, attention, output projection and MLP."""

    def __init__(self, original: nn.Module, rope):
        super().__init__()
        self.original, self.rope = original, rope
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        cache, position_embeddings = cache_from(kwargs), kwargs.get("position_embeddings")
        if cache is None or position_embeddings is None:
            # The decoder passed the cache or the rotary tables under a name this version of fastsplit does not
            # know (or not at all): the full layer writes its keys and values itself, whatever it calls them.
            missing = "a KV cache" if cache is None else "position_embeddings"
            warn_fallback(f"{missing} under a known keyword to decoder layers ({'/'.join(_KNOWN)})",
                          "the prompt's last layer runs in full instead of writing keys and values only")
            return self.original(hidden_states, *args, **kwargs)
        attn = self.original.self_attn
        x = self.original.input_layernorm(hidden_states)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        _, k = self.rope(k, k, cos, sin)  # the rotary helper rotates a (q, k) pair; only k is wanted
        cache.update(k, v, attn.layer_idx)
        return hidden_states


def rope_of(layer: nn.Module):
    """The modeling file's ``apply_rotary_pos_emb`` when ``layer`` has the plain Llama-style attention
    (input norm, separate k/v projections, rotary keys, no key norm), else None."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(layer, "input_layernorm") or hasattr(attn, "k_norm"):
        return None
    if not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim", "layer_idx")):
        return None
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


@contextlib.contextmanager
def keys_values_only(model: nn.Module, layer: int) -> Iterator[bool]:
    """Within the block, decoder layer ``layer`` only writes its keys and values to the KV cache and passes
    its input through. For a prompt whose outputs at the last layer are never read (only later tokens'
    are), this skips most of that layer. Yields False, and changes nothing, for an attention it does not
    know (a key norm, fused projections, no rotary helper): the caller's results are the same either way."""
    layers = decoder_layers(model)
    original = layers[layer]
    rope = rope_of(original)
    if rope is None:
        yield False
        return
    layers[layer] = _KeysValuesOnly(original, rope)
    try:
        yield True
    finally:
        layers[layer] = original


def alias_skipped(cache, layer: int) -> None:
    """Point the cache slots of the pass-through layers below ``layer`` at a computed layer of the same kind,
    so the model's mask and length look-ups (which read the first layer of each kind) see real lengths."""
    slots = cache.layers
    for i in range(layer):
        kind = (type(slots[i]), getattr(slots[i], "is_sliding", False))
        same = [j for j in range(layer, len(slots)) if (type(slots[j]), getattr(slots[j], "is_sliding", False)) == kind]
        slots[i] = slots[same[0] if same else layer]


def repeat_rows(cache, repeats: int) -> None:
    """``cache.batch_repeat_interleave(repeats)`` that repeats each layer's slot once, even where
    :func:`alias_skipped` made several layers share one slot (the cache's own method would repeat it again for
    every alias)."""
    seen = set()
    for slot in cache.layers:
        if id(slot) not in seen:
            seen.add(id(slot))
            slot.batch_repeat_interleave(repeats)


def window_shorter_than(model: nn.Module, length: int) -> bool:
    """Whether some layer attends through a sliding window shorter than ``length`` tokens. Such a window counts
    cache slots, padding included, so a layout that pads inside a row (packing; the sweep's shared prefix
    followed by a left-padded rest) would narrow it: callers fall back to a layout without."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
    return sliding and window is not None and window < length


def affine_in_m(model: nn.Module, layer: int, site: str) -> bool:
    """Whether the residual stream after steered layer ``layer`` is exactly r0 + m·d: the update enters it by
    addition (the residual site; down_proj in a layer with no norm after its MLP, as in Llama and Qwen2, not
    Gemma-2), and a layer follows it."""
    layers = decoder_layers(model)
    if layer == len(layers) - 1:
        return False
    return site == "residual" or not hasattr(layers[layer], "post_feedforward_layernorm")


def new_cache(model: nn.Module):
    """An empty transformers KV cache for ``model`` (DynamicCache, laid out by the model's config)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def layer_states(cache, first: int) -> dict:
    """``{layer: (keys, values)}`` of the cache's layers from ``first`` up that hold states, each [rows, kv_heads,
    tokens, head_dim] (the slots below a first m-dependent layer are :func:`alias_skipped` aliases, not states)."""
    return {i: (slot.keys, slot.values) for i, slot in enumerate(cache.layers)
            if i >= first and getattr(slot, "is_initialized", False)}


def cache_of(model: nn.Module, states: dict):
    """A new cache for ``model`` holding ``states`` ({layer: (keys, values)}, as :func:`layer_states` gives), as if
    those layers had written them: the inverse of :func:`layer_states`, for caches that crossed processes."""
    cache = new_cache(model)
    for i in sorted(states):
        cache.update(*states[i], i)
    return cache

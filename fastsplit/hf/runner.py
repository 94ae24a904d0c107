"""Running a Hugging Face decoder from layer L on cached inputs, and padding token rows into batches.

``capture_layer_input`` / ``from_layer`` let workflows compute the frozen layers below an intervention
once and then run only layers L.. on the cached activations: the layers below L are swapped for
pass-through modules and layer L's input is replaced by the cached tensor, so the model's own forward
(masks, rotary embeddings, per-layer attention types) stays in charge. Internals used: ``internals.py``.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .compat import cache_kwargs, warn_fallback

__all__ = ["decoder", "decoder_layers", "lm_head", "logit_softcap", "model_name", "config_name", "capture_layer_input",
           "from_layer", "last_hidden", "pad", "pad_rows", "pad_id_of", "completion_positions"]


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise TypeError(f"{type(model).__name__} has no decoder with .layers (see fastsplit.hf.internals for the "
                    "supported architectures)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def lm_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None)")
    return head


def logit_softcap(model: nn.Module):
    return getattr(model.config, "final_logit_softcapping", None) or None


def config_name(cfg) -> str:
    """The name a model's config gives itself (its folder or hub id), else its model type."""
    return getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or cfg.model_type


def model_name(model: nn.Module) -> str:
    return config_name(model.config)


class _StopForward(Exception):
    pass


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_layer_input(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor,
                        position_ids: Tensor | None = None, cache=None) -> Tensor:
    """The hidden states entering decoder layer ``layer`` [B, T, H]; layers >= ``layer`` are not run.

    With ``cache`` (a transformers cache) the layers below ``layer`` read and extend it, so a
    prompt's cache can serve later calls on its continuations; ``attention_mask`` then spans cache + input.
    """
    captured = {}

    def hook(mod, args, kwargs):
        captured["h"] = _hidden_arg(args, kwargs).detach().clone()
        raise _StopForward

    _run_until(model, decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True), input_ids,
               attention_mask, position_ids, cache)
    return captured["h"]


def _run_until(model, handle, input_ids, attention_mask, position_ids, cache) -> None:
    """Run the decoder until the hook behind ``handle`` stops it (:class:`_StopForward`); the hook is removed."""
    try:
        dec = decoder(model)
        dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **cache_kwargs(dec, cache))
    except _StopForward:
        pass
    finally:
        handle.remove()


def capture_site_output(model: nn.Module, layer: int, site: str, input_ids: Tensor, attention_mask: Tensor,
                        position_ids: Tensor | None = None, cache=None) -> Tensor:
    """The output of decoder layer ``layer`` (``site="residual"``: the residual stream after the block) or of its MLP's
    ``down_proj`` (``site="down_proj"``) [B, T, H]; the layers above are not run. With ``cache`` the layers up to
    ``layer`` read and extend it (``attention_mask`` then spans cache + input), as in :func:`capture_layer_input`."""
    captured = {}

    def hook(mod, args, out):
        captured["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        raise _StopForward

    block = decoder_layers(model)[layer]
    target = block if site == "residual" else block.mlp.down_proj
    _run_until(model, target.register_forward_hook(hook), input_ids, attention_mask, position_ids, cache)
    return captured["h"]


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the cached point: returns its hidden states unchanged."""

    def __init__(self, original: nn.Module):
        super().__init__()
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _takes_hidden_first(layer: nn.Module) -> bool:
    try:
        params = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


@contextlib.contextmanager
def from_layer(model: nn.Module, layer: int, hidden: Tensor) -> Iterator[None]:
    """Within the block, a forward of ``model`` skips layers < ``layer`` and feeds ``hidden`` [B, T, H]
    to layer ``layer``. Call the model with the batch's ``input_ids`` and ``attention_mask`` as usual."""
    layers = decoder_layers(model)
    if not _takes_hidden_first(layers[layer]):
        warn_fallback(f"hidden_states as the first argument of {type(layers[layer]).__name__}.forward",
                      "the layers below the cached point run in full")
        yield
        return
    originals = [layers[i] for i in range(layer)]

    def hook(mod, args, kwargs):
        h = _hidden_arg(args, kwargs)
        if h.shape != hidden.shape:
            raise ValueError(f"cached hidden states {tuple(hidden.shape)} do not fit this batch {tuple(h.shape)}")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, orig in enumerate(originals):
            layers[i] = _PassThrough(orig)
        yield
    finally:
        handle.remove()
        for i, orig in enumerate(originals):
            layers[i] = orig


@contextlib.contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict]:
    """Within the block, every forward of ``model`` records the hidden states leaving decoder layers ``layers``
    (the residual stream after each) in the yielded dict, ``{layer: [B, T, H]}`` (the last forward's)."""
    seen: dict = {}
    mods = decoder_layers(model)

    def hook_for(i):
        def hook(mod, args, out):
            seen[i] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook
    handles = [mods[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def last_hidden(model: nn.Module, hidden_in: Tensor | None = None, *, start: int = 0, cache=None,
                **forward_kwargs) -> Tensor:
    """Final hidden states [N, T, H] (after the final norm) of the decoder called with ``forward_kwargs``
    (input_ids, attention_mask, position_ids), reading and extending ``cache`` (a transformers cache; none by
    default) under whatever keyword the installed transformers uses. With ``hidden_in``, the input of layer
    ``start`` [N, T, H], the layers below ``start`` are skipped."""
    dec = decoder(model)
    forward_kwargs.update(cache_kwargs(dec, cache))
    if hidden_in is None:
        return dec(**forward_kwargs).last_hidden_state
    with from_layer(model, start, hidden_in):
        return dec(**forward_kwargs).last_hidden_state


def pad(seqs: Sequence, value, *, length: int | None = None, left: bool = False) -> Tensor:
    """The one padding helper: token-id lists or tensors [t, ...] into one batch [N, length, ...].

    Id lists give an int64 tensor; tensors keep their dtype and device. ``left=True`` pads on the left."""
    rows = [s if isinstance(s, Tensor) else torch.tensor(list(s), dtype=torch.long) for s in seqs]
    T = max(r.shape[0] for r in rows) if length is None else length
    out = rows[0].new_full((len(rows), T, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        n = r.shape[0]
        if n and left:
            out[i, T - n:] = r
        elif n:
            out[i, :n] = r
    return out


def pad_rows(rows: Sequence[list[int]], pad_id: int, *, left: bool = False, length: int | None = None):
    """Pad token-id lists into (ids [N, T], attention_mask [N, T])."""
    ids = pad(rows, pad_id, length=length, left=left)
    mask = pad([[1] * len(r) for r in rows], 0, length=ids.shape[1], left=left)
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pid


def completion_positions(targets: Tensor, ignore_index: int = -100):
    """Where a batch's targets are, as indices that gather them into a small dense batch, on the host.

    ``targets`` [N, T] (CPU) holds at each hidden position the token it predicts, ``ignore_index``
    elsewhere. Returns (rows [N, C], cols [N, C], targets [N, C]) with C the most targets in a row; a
    row with fewer is padded with position 0 and ``ignore_index``. ``hidden[rows, cols]`` is then the
    [N, C, H] input of ``split_loss(..., shift=False)``: only completion positions reach the loss, and
    the shapes come from host data, so nothing waits on the device."""
    if targets.device.type != "cpu":
        raise ValueError("completion_positions reads targets on the host; build them on the CPU")
    keep = targets != ignore_index
    cols = [torch.nonzero(k).flatten() for k in keep]
    C = max(1, max(len(c) for c in cols))
    col = pad(cols, 0, length=C)
    tgt = pad([t[c] for t, c in zip(targets, cols)], ignore_index, length=C)
    row = torch.arange(targets.shape[0])[:, None].expand(-1, C)
    return row, col, tgt

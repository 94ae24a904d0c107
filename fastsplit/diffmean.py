"""Difference-of-means steering vectors ("Towards Understanding Steering Strength", arXiv 2602.02712, §2): no
optimisation, one batched forward per text up to the steered layer, no gradient.

The vector is the mean, over the positive texts, of the hidden state at the site (``residual``: the residual
stream after the block, the paper's; ``down_proj``: the MLP's output) averaged over each text's tokens, minus the
same over the negative texts. Two sources:

* polarity pairs (the default): prompt + positive completion against prompt + negative completion, encoded as
  training and sweeps encode them (:func:`fastsplit.encode_pair`). Each text is averaged over its completion's
  tokens: the prompt's hidden states are the same on both sides (the model is causal), so including them would
  only weigh each pair's difference by its length;
* two lists of texts (``positive_texts``, ``negative_texts``; the paper: texts written to show the concept against
  the model's own unconditioned samples), tokenised as plain text and averaged over all their tokens, at most
  ``max_tokens`` of each.

The result is an ordinary vector steering (its Δb is the vector, unnormalised unless ``normalize=True``; its norm
is saved in the metadata as ``diffmean_norm``), so sweep, compare, export, generate and the vLLM plugin take it
unchanged.

Example::

    >>> steering = fastsplit.diffmean(model, tok, train_pairs, layer=15, site="residual")
    >>> steering.save("optimism-diffmean.safetensors")
"""
from __future__ import annotations

import copy
import os
from typing import Sequence

import torch

from . import hf
from .data import Pair, encode_pair

__all__ = ["diffmean", "site_means"]


@torch.no_grad()
def site_means(model, layer: int, site: str, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *,
               pad: int, batch_size: int = 16) -> torch.Tensor:
    """The hidden state at ``site`` of decoder layer ``layer``, averaged over ``rows[i][a:b]`` for ``spans[i] = (a,
    b)``: [len(rows), H] in float32. Rows run in batches of similar lengths, right-padded, up to the layer only. The
    tokens every row shares before every span (a chat template's header) run once, and their KV cache serves every
    batch (not with a sliding window shorter than a row, which would count the cache differently)."""
    device = next(model.parameters()).device
    c = min(len(os.path.commonprefix([list(r) for r in rows])), min(a for a, _ in spans))
    if c and hf.window_shorter_than(model, max(len(r) for r in rows)):
        c = 0
    prefix = None
    if c:
        prefix = hf.new_cache(model)
        ids = torch.tensor([list(rows[0][:c])], device=device)
        hf.capture_site_output(model, layer, site, ids, torch.ones_like(ids), torch.arange(c, device=device)[None],
                               prefix)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.config.hidden_size, dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = hf.pad_rows([list(rows[i][c:]) for i in idx], pad)
        cache = None
        if c:
            cache = copy.deepcopy(prefix)
            hf.repeat_rows(cache, len(idx))
            mask = torch.cat([torch.ones(len(idx), c, dtype=mask.dtype), mask], dim=1)
        pos = (c + torch.arange(ids.shape[1]))[None].expand(len(idx), -1)
        h = hf.capture_site_output(model, layer, site, ids.to(device), mask.to(device), pos.to(device),
                                   cache).float().cpu()
        for k, i in enumerate(idx):
            a, b = spans[i]
            out[i] = h[k, a - c:b - c].mean(0)
    return out


def diffmean(model, tokenizer, pairs: Sequence[Pair] | None = None, *, layer: int, site: str = "residual",
             positive_texts: Sequence[str] | None = None, negative_texts: Sequence[str] | None = None,
             normalize: bool = False, chat: bool = True, max_tokens: int = 300, batch_size: int = 16,
             backend: str = "auto") -> hf.Steering:
    """A vector steering at ``layer`` / ``site``, attached to ``model``, whose Δb is the difference of means of the
    hidden states of the positive and negative texts (see the module's docstring). Give ``pairs``, or both
    ``positive_texts`` and ``negative_texts``. Returns the attached :class:`fastsplit.Steering`
    (``objective="diffmean"``; ``steering.notes["diffmean_norm"]``: the vector's norm before any normalisation)."""
    if site not in hf.SITES:
        raise ValueError(f"site must be one of {hf.SITES}, got {site!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    texts = positive_texts is not None or negative_texts is not None
    if texts and pairs is not None:
        raise ValueError("give pairs, or positive_texts and negative_texts, not both")
    if texts:
        if not positive_texts or not negative_texts:
            raise ValueError("positive_texts and negative_texts must both hold at least one text")
        sides = []
        for name, group in (("positive_texts", positive_texts), ("negative_texts", negative_texts)):
            ids = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in group]
            empty = [i for i, row in enumerate(ids) if not row]
            if empty:
                raise ValueError(f"{name}[{empty[0]}] tokenises to nothing")
            sides.append((ids, [(0, len(row)) for row in ids]))
    else:
        if not pairs:
            raise ValueError("pairs is empty (or give positive_texts and negative_texts)")
        enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
        sides = [([p + c for p, c, _ in enc], [(len(p), len(p) + len(c)) for p, c, _ in enc]),
                 ([p + n for p, _, n in enc], [(len(p), len(p) + len(n)) for p, _, n in enc])]
    layer = hf.resolve_layer(layer, len(hf.decoder_layers(model)))
    pad = hf.pad_id_of(tokenizer)
    (pos_rows, pos_spans), (neg_rows, neg_spans) = sides
    means = site_means(model, layer, site, pos_rows + neg_rows, pos_spans + neg_spans, pad=pad,
                       batch_size=batch_size).double()  # one call: the shared prefix runs once for both sides
    v = means[:len(pos_rows)].mean(0) - means[len(pos_rows):].mean(0)
    norm = float(v.norm())
    if normalize:
        if norm == 0:
            raise ValueError("the difference of means is zero: there is no direction to normalise")
        v = v / norm
    steering = hf.attach(model, layer, "vector", site=site, backend=backend)
    with torch.no_grad():
        steering.module.delta_bias.copy_(v.to(steering.module.delta_bias.dtype))
    steering.objective = "diffmean"
    steering.notes = {"diffmean_norm": repr(norm), "diffmean_normalized": "1" if normalize else "0",
                      "diffmean_source": "texts" if texts else "pairs"}
    return steering

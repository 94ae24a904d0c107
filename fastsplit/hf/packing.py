"""Training layouts over encoded pairs: one row per side, or one packed row per pair, each with an optional
cache of the frozen layers' output. Internals used: ``internals.py`` (attention implementation, sliding
window)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .kv import window_shorter_than
from .runner import capture_layer_input, pad, pad_rows

__all__ = ["SideRows", "PackedRows", "packable"]

Encoded = Sequence[tuple[list[int], list[int], list[int]]]  # (prompt, positive, negative) token ids per pair


class SideRows:
    """Each pair as two rows, ``[prompt | positive]`` and ``[prompt | negative]``, right padded.
    ``targets`` hold at each hidden position the token it predicts (-100 elsewhere)."""

    def __init__(self, enc: Encoded, pad_id: int):
        self.enc, self.pad = list(enc), pad_id
        self.cache: dict[tuple[int, int], Tensor] | None = None

    def row(self, i: int, side: int) -> tuple[list[int], list[int]]:
        prompt, pos, neg = self.enc[i]
        comp = (pos, neg)[side]
        return prompt + comp, comp

    def build_cache(self, model, layer: int, device, batch: int = 16, only: Sequence[int] | None = None) -> None:
        """Cache the input of ``layer`` for every pair, or for the pairs in ``only`` (a rank's shard)."""
        self.cache = {}
        keys = [(i, s) for i in (range(len(self.enc)) if only is None else only) for s in (0, 1)]
        for k in range(0, len(keys), batch):
            chunk = keys[k:k + batch]
            ids, mask = pad_rows([self.row(i, s)[0] for i, s in chunk], self.pad)
            h = capture_layer_input(model, layer, ids.to(device), mask.to(device))
            for j, key in enumerate(chunk):
                self.cache[key] = h[j, : int(mask[j].sum())].cpu()

    def cache_bytes(self, hidden: int, only: Sequence[int] | None = None) -> int:
        enc = self.enc if only is None else [self.enc[i] for i in only]
        return sum(len(p) + max(len(a), len(b)) for p, a, b in enc) * 2 * hidden * 4

    def batch(self, keys: Sequence[tuple[int, int]], device):
        """ids, mask [N, T] on ``device``; targets [N, T] on the CPU; cached layer input [N, T, H] or None."""
        rows = [self.row(i, s) for i, s in keys]
        ids, mask = pad_rows([r[0] for r in rows], self.pad)
        T = ids.shape[1]
        targets = pad([[-100] * (len(r[0]) - len(r[1]) - 1) + r[1] for r in rows], -100, length=T)
        hidden = pad([self.cache[k] for k in keys], 0.0, length=T).to(device) if self.cache is not None else None
        return ids.to(device), mask.to(device), targets, hidden


class PackedRows:
    """One row per pair, ``[prompt | first | second]``: the second completion cannot see the first (a 4-D
    mask) and its positions restart after the prompt, so the prompt runs once for both completions."""

    def __init__(self, enc: Encoded, pad_id: int, dtype: torch.dtype):
        self.enc, self.pad, self.dtype = list(enc), pad_id, dtype
        self.cache: dict[int, Tensor] | None = None

    def length(self, i: int) -> int:
        p, a, b = self.enc[i]
        return len(p) + len(a) + len(b)

    def layout(self, idx: Sequence[int]):
        """ids, 4-D additive mask [N, 1, T, T], position ids, and the targets of the first and second
        completion at the hidden positions that predict them [N, T] (-100 elsewhere); all on the CPU."""
        ids, _ = pad_rows([sum(self.enc[i], []) for i in idx], self.pad)
        n, T = ids.shape
        pos = torch.zeros((n, T), dtype=torch.long)
        second = torch.zeros((n, T), dtype=torch.bool)
        first_k = torch.zeros((n, T), dtype=torch.bool)
        t1 = torch.full((n, T), -100, dtype=torch.long)
        t2 = torch.full((n, T), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            p, a, b = self.enc[i]
            P, A = len(p), len(a)
            pos[j, : P + A] = torch.arange(P + A)
            pos[j, P + A: P + A + len(b)] = torch.arange(P, P + len(b))
            first_k[j, P: P + A] = True
            second[j, P + A: P + A + len(b)] = True
            t1[j, P - 1: P - 1 + A] = torch.tensor(a)  # hidden at P-1+t predicts first[t]
            t2[j, P - 1] = b[0]  # the prompt's last position predicts both first tokens
            if len(b) > 1:
                t2[j, P + A: P + A + len(b) - 1] = torch.tensor(b[1:])
        q = torch.arange(T)
        allowed = (q[None, :] <= q[:, None])[None] & ~(second[:, :, None] & first_k[:, None, :])
        mask = torch.zeros((n, 1, T, T), dtype=self.dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        return ids, mask, pos, t1, t2

    def build_cache(self, model, layer: int, device, batch: int = 16, only: Sequence[int] | None = None) -> None:
        """Cache the input of ``layer`` for every pair, or for the pairs in ``only`` (a rank's shard)."""
        self.cache = {}
        todo = list(range(len(self.enc)) if only is None else only)
        for k in range(0, len(todo), batch):
            idx = todo[k:k + batch]
            ids, mask, pos, _, _ = self.layout(idx)
            h = capture_layer_input(model, layer, ids.to(device), mask.to(device), position_ids=pos.to(device))
            for j, i in enumerate(idx):
                self.cache[i] = h[j, : self.length(i)].cpu()

    def cache_bytes(self, hidden: int, only: Sequence[int] | None = None) -> int:
        return sum(self.length(i) for i in (range(len(self.enc)) if only is None else only)) * hidden * 4

    def batch(self, idx: Sequence[int], device):
        """ids, mask, positions on ``device``; both sides' targets on the CPU; cached layer input or None."""
        ids, mask, pos, t1, t2 = self.layout(idx)
        hidden = pad([self.cache[i] for i in idx], 0.0, length=ids.shape[1]).to(device) \
            if self.cache is not None else None
        return ids.to(device), mask.to(device), pos.to(device), t1, t2, hidden


def packable(model, enc: Encoded) -> bool:
    """Packing needs an attention that takes a 4-D additive mask, and no sliding window shorter than a row
    (the given mask replaces the model's sliding-window mask)."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    return not window_shorter_than(model, max(len(p) + len(a) + len(b) for p, a, b in enc))

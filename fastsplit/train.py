"""SPLIT training of a steering intervention on polarity-paired data.

Each step puts the positive and the negative rows of a batch through ONE forward with per-row
factors, and takes the loss from the fused :func:`fastsplit.split_loss` on the final hidden states
(never HF logits). The frozen layers below the intervention run once, before the first epoch, when
their output fits the cache budget; every step then starts at layer L.
"""
from __future__ import annotations

import glob
import math
import os
import random
from typing import Sequence

import torch
from torch import Tensor

from . import models
from .data import Pair, encode_pair
from .ops.split_loss import split_loss
from .steering import Steering

__all__ = ["train"]

PAIR_TYPES = ("add", "sub")
_CACHE_BUDGET = 2 << 30  # bytes of cached layer-L inputs allowed by cache_prefix="auto"


def pad_rows(rows: Sequence[list[int]], pad_id: int, *, left: bool = False):
    """Pad token-id lists into (ids [N, T], attention_mask [N, T])."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pid


def _labels(prompt_len: int, completion: list[int], T: int) -> list[int]:
    lab = [-100] * prompt_len + completion
    return lab + [-100] * (T - len(lab))


def _pad_cached(parts: Sequence[Tensor], T: int, device) -> Tensor:
    """Cached per-row layer inputs [t_i, H] right-padded into one batch [N, T, H] on ``device``."""
    out = parts[0].new_zeros((len(parts), T, parts[0].shape[-1]))
    for j, c in enumerate(parts):
        out[j, : c.shape[0]] = c
    return out.to(device)


class _Rows:
    """Encoded pairs as per-side token rows, plus (optionally) cached layer-L inputs per row."""

    def __init__(self, tokenizer, pairs: Sequence[Pair], chat: bool):
        self.enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
        self.pad = pad_id_of(tokenizer)
        self.cache: dict[tuple[int, int], Tensor] | None = None

    def row(self, i: int, side: int) -> tuple[list[int], list[int]]:
        prompt, pos, neg = self.enc[i]
        comp = (pos, neg)[side]
        return prompt + comp, comp

    def build_cache(self, model, layer: int, device, batch: int = 16) -> None:
        self.cache = {}
        keys = [(i, s) for i in range(len(self.enc)) for s in (0, 1)]
        for k in range(0, len(keys), batch):
            chunk = keys[k:k + batch]
            ids, mask = pad_rows([self.row(i, s)[0] for i, s in chunk], self.pad)
            h = models.capture_layer_input(model, layer, ids.to(device), mask.to(device))
            for j, key in enumerate(chunk):
                self.cache[key] = h[j, : int(mask[j].sum())].cpu()

    def cache_bytes(self, hidden: int) -> int:
        return sum(len(p) + max(len(a), len(b)) for p, a, b in self.enc) * 2 * hidden * 4

    def batch(self, keys: Sequence[tuple[int, int]], device):
        """ids, mask, labels [N, T] (right padded) and the cached layer input [N, T, H] or None."""
        rows = [self.row(i, s) for i, s in keys]
        ids, mask = pad_rows([r[0] for r in rows], self.pad)
        T = ids.shape[1]
        labels = torch.tensor([_labels(len(r[0]) - len(r[1]), r[1], T) for r in rows], dtype=torch.long)
        hidden = _pad_cached([self.cache[k] for k in keys], T, device) if self.cache is not None else None
        return ids.to(device), mask.to(device), labels.to(device), hidden


class _Packed:
    """One row per pair, ``[prompt | first | second]``: the second completion cannot see the first (a 4-D
    mask) and its positions restart after the prompt, so the prompt runs once for both completions."""

    def __init__(self, rows: _Rows, dtype: torch.dtype):
        self.rows, self.dtype = rows, dtype
        self.cache: dict[int, Tensor] | None = None

    def length(self, i: int) -> int:
        p, a, b = self.rows.enc[i]
        return len(p) + len(a) + len(b)

    def layout(self, idx: Sequence[int], device):
        """ids, 4-D additive mask [N, 1, T, T], position ids, and the targets of the first and second
        completion at the hidden positions that predict them [N, T] (-100 elsewhere)."""
        T = max(self.length(i) for i in idx)
        n = len(idx)
        ids = torch.full((n, T), self.rows.pad, dtype=torch.long)
        pos = torch.zeros((n, T), dtype=torch.long)
        second = torch.zeros((n, T), dtype=torch.bool)
        first_k = torch.zeros((n, T), dtype=torch.bool)
        t1 = torch.full((n, T), -100, dtype=torch.long)
        t2 = torch.full((n, T), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            p, a, b = self.rows.enc[i]
            P, A = len(p), len(a)
            ids[j, : P + A + len(b)] = torch.tensor(p + a + b)
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
        return ids.to(device), mask.to(device), pos.to(device), t1.to(device), t2.to(device)

    def build_cache(self, model, layer: int, device, batch: int = 16) -> None:
        self.cache = {}
        n = len(self.rows.enc)
        for k in range(0, n, batch):
            idx = list(range(k, min(n, k + batch)))
            ids, mask, pos, _, _ = self.layout(idx, device)
            h = models.capture_layer_input(model, layer, ids, mask, position_ids=pos)
            for j, i in enumerate(idx):
                self.cache[i] = h[j, : self.length(i)].cpu()

    def cache_bytes(self, hidden: int) -> int:
        return sum(self.length(i) for i in range(len(self.rows.enc))) * hidden * 4

    def batch(self, idx: Sequence[int], device):
        ids, mask, pos, t1, t2 = self.layout(idx, device)
        hidden = _pad_cached([self.cache[i] for i in idx], ids.shape[1], device) if self.cache is not None else None
        return ids, mask, pos, t1, t2, hidden


def _packable(model, rows: _Rows) -> bool:
    """Packing needs an attention that takes a 4-D additive mask, and no sliding window shorter than a row
    (the given mask replaces the model's sliding-window mask)."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    longest = max(len(p) + len(a) + len(b) for p, a, b in rows.enc)
    window = getattr(cfg, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or [])
    return not (sliding and window is not None and window < longest)


def last_hidden(model, steering: Steering, hidden_in: Tensor | None, *, start: int | None = None,
                **forward_kwargs) -> Tensor:
    """Final hidden states [N, T, H] (after the final norm) of the decoder called with ``forward_kwargs``
    (input_ids, attention_mask, ...; no KV cache unless given), starting at layer ``start`` (default: the
    intervention's layer) when that layer's input ``hidden_in`` is given."""
    dec = models.decoder(model)
    forward_kwargs.setdefault("use_cache", False)
    if hidden_in is None:
        return dec(**forward_kwargs).last_hidden_state
    with models.from_layer(model, steering.layer if start is None else start, hidden_in):
        return dec(**forward_kwargs).last_hidden_state


def _checkpoints(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "checkpoint-epoch*.pt")),
                  key=lambda p: int(p.rsplit("epoch", 1)[1].split(".")[0]))


def train(model, tokenizer, steering: Steering, pairs: Sequence[Pair], *, loss: str = "split",
          lambda_p: float = 1.0, lambda_n: float = 0.5, gamma: float = 5.0, theta: float = 0.4,
          reduction: str = "batch", steering_factors: Sequence[float] = (1.0,), lr: float = 1e-2,
          epochs: int = 1, batch_size: int = 8, grad_accum: int = 1, seed: int = 0,
          pair_types: Sequence[str] = ("add",), chat: bool = True, cache_prefix: bool | str = "auto",
          pack_pairs: bool | str = "auto",
          checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``steering``'s parameters with SPLIT (``loss="split"``) or plain SFT on the positives (``"sft"``).

    Each pair gets a factor drawn from ``steering_factors`` and a type from ``pair_types``: "add" trains
    the positive completion at +m, "sub" swaps the completions and uses −m. AdamW (weight decay 0), linear
    decay, gradient clipping at 1.0. ``pack_pairs`` ("auto") puts a pair's prompt and both completions in one
    row (the negative masked from the positive), so the prompt runs once; "auto" packs unless the model's
    attention or a short sliding window forbids it. With ``checkpoint_dir`` a checkpoint is written each epoch, and
    ``resume=True`` continues from the newest one, giving the same final parameters as an uninterrupted run.

    Returns {"history": [per-epoch means of loss, pos, neg, pref_log_odds], "steps": optimizer steps}.

    Example::

        >>> steering = fastsplit.attach(model, layer=15, form="vector")
        >>> fastsplit.train(model, tok, steering, fastsplit.demo_pairs()[:200], epochs=2)
    """
    if loss not in ("split", "sft"):
        raise ValueError(f"loss must be 'split' or 'sft', got {loss!r}")
    bad = [t for t in pair_types if t not in PAIR_TYPES]
    if bad or not pair_types:
        raise ValueError(f"pair_types must be a non-empty subset of {PAIR_TYPES}, got {tuple(pair_types)}")
    if not steering_factors or any(not math.isfinite(float(f)) for f in steering_factors):
        raise ValueError(f"steering_factors must be finite numbers, got {tuple(steering_factors)}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not pairs:
        raise ValueError("pairs is empty")
    from tqdm.auto import tqdm

    device = next(steering.module.parameters()).device
    params = steering.parameters()
    rows = _Rows(tokenizer, pairs, chat)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: a step is a deterministic function of the data and the factors
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    H = model.config.hidden_size
    packed = None
    if pack_pairs is True or (pack_pairs == "auto" and _packable(model, rows)):
        packed = _Packed(rows, next(model.parameters()).dtype)
    layout = packed or rows
    if steering.layer > 0 and (cache_prefix is True or (cache_prefix == "auto"
                                                        and layout.cache_bytes(H) <= _CACHE_BUDGET)):
        layout.build_cache(model, steering.layer, device)
    head = models.lm_head(model)
    n_batches = math.ceil(len(pairs) / batch_size)
    total_steps = max(1, math.ceil(n_batches / grad_accum) * epochs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    config = dict(loss=loss, lambda_p=lambda_p, lambda_n=lambda_n, gamma=gamma, theta=theta, reduction=reduction,
                  steering_factors=[float(f) for f in steering_factors], lr=lr, epochs=epochs, batch_size=batch_size,
                  grad_accum=grad_accum, seed=seed, pair_types=list(pair_types), n_pairs=len(pairs))
    start, history, steps = 0, [], 0
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        found = _checkpoints(checkpoint_dir)
        if resume and found:
            ck = torch.load(found[-1], map_location=device, weights_only=False)
            if ck["config"] != config:
                diff = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
                raise ValueError(f"{found[-1]} was written with other settings (checkpoint, now): {diff}")
            steering.load_state_dict(ck["params"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            start, history, steps = ck["epoch"], ck["history"], ck["steps"]
    softcap = models.logit_softcap(model)
    hp = dict(lambda_p=lambda_p, lambda_n=lambda_n, gamma=gamma, theta=theta) if loss == "split" else \
        dict(lambda_p=1.0, lambda_n=0.0, gamma=0.0, theta=0.0)
    try:
        for epoch in range(start, epochs):
            rng = random.Random(f"{seed}:{epoch}")  # per-epoch stream: a resumed run replays it exactly
            order = list(range(len(pairs)))
            rng.shuffle(order)
            sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "pref_log_odds": 0.0}
            bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for b in bar:
                idx = order[b * batch_size:(b + 1) * batch_size]
                kinds = [rng.choice(list(pair_types)) for _ in idx]
                factors = [float(rng.choice(list(steering_factors))) for _ in idx]
                # "sub" swaps the completions and steers with -m.
                m = torch.tensor([f if k == "add" else -f for f, k in zip(factors, kinds)], device=device)
                m = m.to(params[0].dtype)
                if packed is not None:
                    ids, mask, pos, t1, t2, h_in = packed.batch(idx, device)
                    sub = torch.tensor([k == "sub" for k in kinds], device=device)[:, None]
                    lab_pos, lab_neg = torch.where(sub, t2, t1), torch.where(sub, t1, t2)
                    with steering.multiplier(m):
                        h = last_hidden(model, steering, h_in, input_ids=ids, attention_mask=mask, position_ids=pos)
                    h_pos = h_neg = h
                else:
                    pos_keys = [(i, 1 if k == "sub" else 0) for i, k in zip(idx, kinds)]
                    neg_keys = [(i, 0 if k == "sub" else 1) for i, k in zip(idx, kinds)]
                    ids, mask, labels, h_in = rows.batch(pos_keys + (neg_keys if loss == "split" else []), device)
                    with steering.multiplier(torch.cat([m, m]) if loss == "split" else m):
                        h = last_hidden(model, steering, h_in, input_ids=ids, attention_mask=mask)
                    nb = len(idx)
                    h_pos, lab_pos = h[:nb], labels[:nb]
                    h_neg, lab_neg = (h[nb:], labels[nb:]) if loss == "split" else (h_pos, lab_pos)
                value, parts = split_loss(h_pos, h_neg, head.weight, lab_pos, lab_neg, reduction=reduction,
                                          lm_head_bias=head.bias, logit_softcap=softcap, return_parts=True,
                                          shift=packed is None, **hp)
                (value / grad_accum).backward()
                if (b + 1) % grad_accum == 0 or b + 1 == n_batches:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    steps += 1
                stats = {"loss": float(value.detach()), "pos": float(parts["pos"].mean()), "neg": float(parts["neg"].mean()),
                         "pref_log_odds": float(parts["pref_log_odds"].mean())}
                for k in sums:
                    sums[k] += stats[k]
                bar.set_postfix({"loss": f"{stats['loss']:.3f}", "L_pos": f"{stats['pos']:.3f}",
                                 "L_neg": f"{stats['neg']:.3f}", "pref": f"{stats['pref_log_odds']:+.3f}"})
            history.append({k: v / n_batches for k, v in sums.items()} | {"epoch": epoch + 1})
            if checkpoint_dir:
                torch.save({"epoch": epoch + 1, "params": steering.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "config": config, "history": history, "steps": steps},
                           os.path.join(checkpoint_dir, f"checkpoint-epoch{epoch + 1}.pt"))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return {"history": history, "steps": steps}

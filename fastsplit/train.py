"""SPLIT training of a steering intervention on polarity-paired data.

Each step puts the positive and the negative completions of a batch through ONE forward with per-row
factors (one packed row per pair where the model allows it), and takes the loss from the fused
:func:`fastsplit.split_loss` on the final hidden states at completion positions only (never HF logits).
The frozen layers below the intervention run once, before the first epoch, when their output fits the
cache budget; every step then starts at layer L.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import random
from typing import Sequence

import torch

from . import dist, hf
from .data import Pair, encode_pair
from .ops._checks import check_strengths
from .ops.split_loss import split_loss

__all__ = ["train", "reps_loss", "LOSSES"]

PAIR_TYPES = ("add", "sub")
_CACHE_BUDGET = 2 << 30  # bytes of cached layer-L inputs allowed by cache_prefix="auto"


LOSSES = ("split", "sft", "reps")


def _check_options(loss, pair_types, steering_factors, epochs, batch_size, grad_accum, pairs) -> list[float]:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    bad = [t for t in pair_types if t not in PAIR_TYPES]
    if bad or not pair_types:
        raise ValueError(f"pair_types must be a non-empty subset of {PAIR_TYPES}, got {tuple(pair_types)}")
    if loss == "reps" and list(pair_types) != ["add"]:
        raise ValueError(f"loss='reps' is bidirectional by itself (its second term nulls the intervention): "
                         f"pair_types must be ('add',), got {tuple(pair_types)}")
    factors = check_strengths("steering_factors", steering_factors)
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not pairs:
        raise ValueError("pairs is empty")
    return factors


def _gather(h, targets, device):
    """Only the completion positions of ``h`` [N, T, H]: ([N, C, H], targets [N, C]) with host indices."""
    rows, cols, tgt = hf.completion_positions(targets)
    return h[rows.to(device), cols.to(device)], tgt.to(device)


def _forward(model, steering, layout, packed: bool, idx, kinds, m, loss: str, device):
    """Final hidden states and targets of both sides of one batch: (h_pos, t_pos, h_neg, t_neg)."""
    start = steering.layer
    if packed:
        ids, mask, pos, t1, t2, h_in = layout.batch(idx, device)
        sub = torch.tensor([k == "sub" for k in kinds])[:, None]
        with steering.multiplier(m):
            h = hf.last_hidden(model, h_in, start=start, input_ids=ids, attention_mask=mask, position_ids=pos)
        return (*_gather(h, torch.where(sub, t2, t1), device), *_gather(h, torch.where(sub, t1, t2), device))
    pos_keys = [(i, 1 if k == "sub" else 0) for i, k in zip(idx, kinds)]
    neg_keys = [(i, 0 if k == "sub" else 1) for i, k in zip(idx, kinds)] if loss == "split" else []
    ids, mask, targets, h_in = layout.batch(pos_keys + neg_keys, device)
    with steering.multiplier(torch.cat([m, m]) if neg_keys else m):
        h = hf.last_hidden(model, h_in, start=start, input_ids=ids, attention_mask=mask)
    n = len(idx)
    h_pos, t_pos = _gather(h[:n], targets[:n], device)
    if not neg_keys:
        return h_pos, t_pos, h_pos, t_pos
    return (h_pos, t_pos, *_gather(h[n:], targets[n:], device))


# --- RePS (Wu et al. 2025, "Improved Representation Steering for Language Models", arXiv 2505.20809) ---------------
# Reference-free, bidirectional, length-normalised preference steering. With the concept completion y_c (our
# positive) and the other one y (our negative), P and N their token-mean NLLs under the intervention at +m, P' and
# N' under the nulling intervention (Steering.nulling for the vector; the intervention at -m for LoRA and
# local_weight), and the unsteered summed NLLs L0_c, L0_y:
#   Δ+ = β+·(−P) − (−N),   β+ = max(L0_c − L0_y, 1)      (log p(y) − log p(y_c) under the unsteered model)
#   Δ− = β−·(−N') − (−P'), β− = max(L0_y − L0_c, 1)
#   loss = mean over pairs of −log σ(Δ+) − log σ(Δ−)
# The NLLs come from sequence_nll (the fused pass: no logits in memory); β± are constants, computed once.

def reps_loss(P, N, P_null, N_null, beta_pos, beta_neg):
    """RePS per pair from the token-mean NLLs ([n] each) and the β weights: −log σ(Δ+) − log σ(Δ−) [n]."""
    import torch.nn.functional as F

    delta_pos = N - beta_pos * P
    delta_neg = P_null - beta_neg * N_null
    return F.softplus(-delta_pos) + F.softplus(-delta_neg)


def _reps_terms(model, steering, layout, packed, idx, m, device, head, softcap):
    """(P, N, P', N') [n]: token-mean NLLs of each pair's concept (positive) and other completion, steered at +m and
    under the nulling intervention."""
    from .ops.split_loss import sequence_nll

    def nlls(factor, null):
        ctx = steering.nulling() if null else contextlib.nullcontext()
        with ctx:
            h_pos, t_pos, h_neg, t_neg = _forward(model, steering, layout, packed, idx, ["add"] * len(idx), factor,
                                                  "split", device)
        kw = dict(lm_head_bias=head.bias, logit_softcap=softcap, shift=False)
        return sequence_nll(h_pos, head.weight, t_pos, **kw), sequence_nll(h_neg, head.weight, t_neg, **kw)

    P, N = nlls(m, False)
    if steering.form == "vector":
        P_null, N_null = nlls(torch.zeros_like(m), True)
    else:
        P_null, N_null = nlls(-m, False)
    return P, N, P_null, N_null


@torch.no_grad()
def _reps_betas(model, steering, layout, packed, ids, device, head, softcap, batch_size, dtype):
    """β+ and β− of the pairs ``ids`` (dict pair -> (β+, β−)) from the unsteered model's summed NLLs."""
    from .ops.split_loss import sequence_nll

    out = {}
    for s in range(0, len(ids), batch_size):
        idx = list(ids[s:s + batch_size])
        zero = torch.zeros(len(idx), device=device, dtype=dtype)
        h_pos, t_pos, h_neg, t_neg = _forward(model, steering, layout, packed, idx, ["add"] * len(idx), zero,
                                              "split", device)
        kw = dict(lm_head_bias=head.bias, logit_softcap=softcap, shift=False, reduction="sum")
        L_c = sequence_nll(h_pos, head.weight, t_pos, **kw)
        L_y = sequence_nll(h_neg, head.weight, t_neg, **kw)
        for i, bp, bn in zip(idx, (L_c - L_y).clamp(min=1.0).tolist(), (L_y - L_c).clamp(min=1.0).tolist()):
            out[i] = (bp, bn)
    return out


class _Step(torch.nn.Module):
    """DistributedDataParallel's view of a training step: the steering tensors are its only parameters (so
    they alone are broadcast at the start and averaged in the backward); the frozen model is replicated on
    every rank and never registered here."""

    def __init__(self, named_params, step):
        super().__init__()
        for n, p in named_params:
            self.register_parameter(n, p)
        self._step = step

    def forward(self, *args):
        return self._step(*args)


def _global_loss(h_pos, t_pos, h_neg, t_neg, head, softcap, hp, reduction, n_global, group, *, empty=False):
    """(surrogate, value, stats) for the part of a global batch held by this rank, exactly as one process
    would see the whole batch: ``surrogate``'s gradient, averaged over the ranks by DDP, is the gradient of the
    global loss ``value``.

    "pair": the loss is a mean over the ``n_global`` pairs, so each rank's local mean is weighted by its share.
    "batch": the hinge acts on token means pooled over the global batch, so the NLL sums are all-reduced first
    (no gradient), then each token's coefficient, (λp + γ·active)/N_pos or (λn − γ·active)/N_neg, is known,
    and the local loss with those weights (γ = 0) has the global gradient. ``empty``: this rank owns none of
    the batch and ran a stand-in pair, which contributes nothing (weight 0)."""
    world = dist.world_size(group)
    keep = 0.0 if empty else 1.0
    kw = dict(lm_head_bias=head.bias, logit_softcap=softcap, shift=False, return_parts=True)
    n_local = h_pos.shape[0]
    if reduction == "pair":
        local, parts = split_loss(h_pos, h_neg, head.weight, t_pos, t_neg, reduction="pair", **kw, **hp)
        sums = torch.stack([local.detach() * n_local, parts["pos"].sum(), parts["neg"].sum()]).double() * keep
        torch.distributed.all_reduce(sums, group=group)
        value, pos, neg = (sums / n_global).tolist()
        return local * (keep * n_local * world / n_global), value, {"pos": pos, "neg": neg, "pref_log_odds": neg - pos}
    count_p, count_n = keep * float((t_pos != -100).sum()), keep * float((t_neg != -100).sum())
    with torch.no_grad():
        _, parts = split_loss(h_pos, h_neg, head.weight, t_pos, t_neg, reduction="batch", **kw, **hp)
    sums = torch.tensor([float(parts["pos"]) * count_p, count_p, float(parts["neg"]) * count_n, count_n],
                        dtype=torch.float64)
    torch.distributed.all_reduce(sums, group=group)
    pos, neg = float(sums[0] / sums[1]), float(sums[2] / sums[3])
    active = float(hp["theta"] - (neg - pos) > 0)
    value = hp["lambda_p"] * pos + hp["lambda_n"] * neg + hp["gamma"] * max(0.0, hp["theta"] - (neg - pos))
    a_pos = (hp["lambda_p"] + hp["gamma"] * active) / float(sums[1])
    a_neg = (hp["lambda_n"] - hp["gamma"] * active) / float(sums[3])
    surrogate, _ = split_loss(h_pos, h_neg, head.weight, t_pos, t_neg, reduction="batch", lambda_p=a_pos * count_p * world,
                              lambda_n=a_neg * count_n * world, gamma=0.0, theta=0.0, **kw)
    return surrogate, value, {"pos": pos, "neg": neg, "pref_log_odds": neg - pos}


def _reps_step(step, idx, m, work, betas, device, dtype, group, pairs, epoch, b):
    """(objective, value, stats) of one RePS batch; under a process group each rank runs its share of the global
    batch (spread by tokens) and the objective's gradient, averaged by DDP, is the global batch's (a mean over its
    pairs)."""
    own = dist.shard_by_work([work[i] for i in idx], group) if group is not None else list(range(len(idx)))
    sel = own or [None]  # a rank with none of the batch runs its first pair at weight 0
    local = [idx[j] if j is not None else idx[0] for j in sel]
    P, N, Pn, Nn = step(local, ["add"] * len(local), torch.tensor([m[j] if j is not None else 1.0 for j in sel],
                                                                   device=device, dtype=dtype))
    beta = torch.tensor([betas[i] for i in local], device=device, dtype=P.dtype)
    per = reps_loss(P, N, Pn, Nn, beta[:, 0], beta[:, 1])
    keep = 1.0 if own else 0.0
    sums = torch.stack([per.detach().sum(), P.detach().sum(), N.detach().sum()]).double() * keep
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    value, pos, neg = (sums / len(idx)).tolist()
    if not math.isfinite(value):
        bad = [local[j] for j, v in enumerate(per.detach().tolist()) if not math.isfinite(v)]
        where = f"epoch {epoch + 1}, batch {b + 1}"
        if not bad:
            raise RuntimeError(f"the RePS loss is not finite at {where} (the bad pair is on another rank)")
        raise RuntimeError(f"the RePS loss is not finite at {where}: first bad pair is #{bad[0]} "
                           f"({pairs[bad[0]].prompt[:60]!r}; a diverged steering parameter? try a lower lr)")
    world = torch.distributed.get_world_size(group) if group is not None else 1
    objective = per.sum() * (keep * world / len(idx))
    return objective, value, {"pos": pos, "neg": neg, "pref_log_odds": neg - pos}


def _check_encoded(enc, pairs, vocab: int) -> None:
    """Training data, checked when encoded and before any model runs: every token id inside the model's
    vocabulary (a label outside it would make the loss NaN on a GPU, where the op does not read labels back)."""
    for i, (prompt, pos, neg) in enumerate(enc):
        top = max(max(prompt, default=0), max(pos), max(neg))
        if top >= vocab:
            raise ValueError(f"pair {i} ({pairs[i].prompt[:60]!r}) encodes to token id {top}, outside the model's "
                             f"vocabulary of {vocab}: the tokenizer does not match the model")


@torch.no_grad()
def _raise_bad_pair(pairs, idx, h_pos, t_pos, h_neg, t_neg, head, softcap, epoch, batch):
    """The loss was not finite: name the first pair of the batch whose hidden states or per-pair NLLs are not."""
    _, parts = split_loss(h_pos.detach(), h_neg.detach(), head.weight, t_pos, t_neg, reduction="pair",
                          lm_head_bias=head.bias, logit_softcap=softcap, shift=False, return_parts=True)
    finite = torch.isfinite(parts["pos"]) & torch.isfinite(parts["neg"])
    finite &= torch.isfinite(h_pos).flatten(1).all(1) & torch.isfinite(h_neg).flatten(1).all(1)
    bad = [j for j, ok in enumerate(finite.tolist()) if not ok]
    where = f"epoch {epoch + 1}, batch {batch + 1}"
    if not bad:
        raise RuntimeError(f"the SPLIT loss is not finite at {where}, though every pair's NLLs are")
    i = idx[bad[0]]
    raise RuntimeError(f"the SPLIT loss is not finite at {where}: first bad pair is #{i} "
                             f"({pairs[i].prompt[:60]!r}); its hidden states or NLLs are NaN/inf (a diverged "
                             "steering parameter? try a lower lr)")


def _checkpoints(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "checkpoint-epoch*.pt")),
                  key=lambda p: int(p.rsplit("epoch", 1)[1].split(".")[0]))


def _resume(folder, config, steering, opt, sched, device):
    """(first epoch, history, steps) from the newest checkpoint in ``folder`` written with ``config``."""
    found = _checkpoints(folder)
    if not found:
        return 0, [], 0
    ck = torch.load(found[-1], map_location=device, weights_only=False)
    if ck["config"] != config:
        diff = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
        raise ValueError(f"{found[-1]} was written with other settings (checkpoint, now): {diff}")
    steering.load_state_dict(ck["params"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    return ck["epoch"], ck["history"], ck["steps"]


def train(model, tokenizer, steering: hf.Steering, pairs: Sequence[Pair], *, loss: str = "split",
          lambda_p: float = 1.0, lambda_n: float = 0.5, gamma: float = 5.0, theta: float = 0.4,
          reduction: str = "batch", steering_factors: Sequence[float] = (1.0,), lr: float = 1e-2,
          epochs: int = 1, batch_size: int = 8, grad_accum: int = 1, seed: int = 0,
          pair_types: Sequence[str] = ("add",), chat: bool = True, cache_prefix: bool | str = "auto",
          pack_pairs: bool | str = "auto",
          checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True, group=None) -> dict:
    """Train ``steering``'s parameters with SPLIT (``loss="split"``), plain SFT on the positives (``"sft"``), or RePS
    (``"reps"``: Wu et al. 2025's reference-free bidirectional preference objective; see :func:`reps_loss`; it
    takes ``pair_types=("add",)`` and ignores λ, γ, θ and ``reduction``).

    ``theta`` is the SPLIT hinge margin θ on the preference log-odds. Each pair gets a factor drawn from
    ``steering_factors`` and a type from ``pair_types``: "add" trains the positive completion at +m, "sub"
    swaps the completions and uses −m. AdamW (weight decay 0), linear decay, gradient clipping at 1.0.
    ``pack_pairs`` ("auto") puts a pair's prompt and both completions in one row (the negative masked from the
    positive), so the prompt runs once; "auto" packs unless the model's attention or a short sliding window
    forbids it. With ``checkpoint_dir`` a checkpoint is written each epoch, and ``resume=True`` continues from
    the newest one, giving the same final parameters as an uninterrupted run.

    Data parallel: inside an initialised process group (``torchrun``; or ``group=``) the steering tensors are
    wrapped in DistributedDataParallel, the frozen model is replicated, and each rank owns a share
    of the pairs, spread by their tokens, and computes their frozen prefix, which the ranks then share. The batches
    are the one-process batches (``batch_size`` is the global batch), each split between the ranks by tokens, and the
    loss is the global batch's, so N ranks give the parameters of one process. Rank 0 writes the checkpoints.

    Returns {"history": [per-epoch means of loss, pos, neg, pref_log_odds], "steps": optimizer steps}.

    Example::

        >>> steering = fastsplit.attach(model, layer=15, form="vector")
        >>> fastsplit.train(model, tok, steering, fastsplit.demo_pairs()[:200], epochs=2)
    """
    factors = _check_options(loss, pair_types, steering_factors, epochs, batch_size, grad_accum, pairs)
    group = dist.active_group(group)
    dist.check_world(len(pairs), "pairs", group)
    from tqdm.auto import tqdm

    device = next(steering.module.parameters()).device
    params = steering.parameters()
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
    _check_encoded(enc, pairs, hf.lm_head(model).weight.shape[0])
    work = [len(p) + len(a) + len(b) for p, a, b in enc]  # tokens a pair puts through the model
    mine = dist.shard_by_work(work, group)  # the pairs whose frozen prefix (and RePS weights) this rank computes
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()  # no dropout: a step is a deterministic function of the data and the factors
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    packed = pack_pairs is True or (pack_pairs == "auto" and hf.packable(model, enc))
    pad = hf.pad_id_of(tokenizer)
    layout = hf.PackedRows(enc, pad, next(model.parameters()).dtype) if packed else hf.SideRows(enc, pad)
    if steering.layer > 0 and (cache_prefix is True or (cache_prefix == "auto" and layout.cache_bytes(
            model.config.hidden_size) <= _CACHE_BUDGET)):
        dist.agree(lambda: layout.build_cache(model, steering.layer, device, only=mine), group,
                   what="prefix cache")
        if group is not None:  # each rank computed its share; every rank holds them all (batches are split anew)
            layout.cache.update(dist.gather_tensors(layout.cache, group, what="prefix cache"))
    head, softcap = hf.lm_head(model), hf.logit_softcap(model)
    n_batches = math.ceil(len(pairs) / batch_size)
    total_steps = max(1, math.ceil(n_batches / grad_accum) * epochs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    config = dict(loss=loss, lambda_p=lambda_p, lambda_n=lambda_n, gamma=gamma, theta=theta, reduction=reduction,
                  steering_factors=factors, lr=lr, epochs=epochs, batch_size=batch_size,
                  grad_accum=grad_accum, seed=seed, pair_types=list(pair_types), n_pairs=len(pairs))
    start, history, steps = 0, [], 0
    main = dist.is_main(group)
    if checkpoint_dir:
        if main:
            os.makedirs(checkpoint_dir, exist_ok=True)
        if resume:
            start, history, steps = dist.agree(lambda: _resume(checkpoint_dir, config, steering, opt, sched, device),
                                               group, what="resume")
    betas = {}
    if loss == "reps":  # β± from the unsteered model, once (the steering is a no-op, or as resumed: m = 0 either way)
        betas = _reps_betas(model, steering, layout, packed, list(mine), device, head, softcap, batch_size,
                            params[0].dtype)
        if group is not None:
            betas.update(dist.all_gather_list(list(betas.items()), group, what="RePS weights"))
    hp = dict(lambda_p=lambda_p, lambda_n=lambda_n, gamma=gamma, theta=theta) if loss == "split" else \
        dict(lambda_p=1.0, lambda_n=0.0, gamma=0.0, theta=0.0)

    def forward(idx, kinds, m):
        if loss == "reps":
            return _reps_terms(model, steering, layout, packed, idx, m, device, head, softcap)
        return _forward(model, steering, layout, packed, idx, kinds, m, loss, device)
    step = forward
    if group is not None:  # after resuming, so the broadcast from rank 0 starts every rank at the same point
        step = torch.nn.parallel.DistributedDataParallel(
            _Step(steering.named_parameters(), forward), device_ids=[device] if device.type == "cuda" else None,
            process_group=group, broadcast_buffers=False)
    try:
        for epoch in range(start, epochs):
            rng = random.Random(f"{seed}:{epoch}")  # per-epoch stream: a resumed run replays it exactly
            order = list(range(len(pairs)))
            rng.shuffle(order)
            sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "pref_log_odds": 0.0}
            bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and main),
                       leave=False)
            for b in bar:
                idx = order[b * batch_size:(b + 1) * batch_size]
                kinds = [rng.choice(list(pair_types)) for _ in idx]
                picked = [float(rng.choice(factors)) for _ in idx]
                # "sub" swaps the completions and steers with -m.
                m = [f if k == "add" else -f for f, k in zip(picked, kinds)]
                if loss == "reps":
                    objective, value, stats = _reps_step(step, idx, m, work, betas, device, params[0].dtype,
                                                         group, pairs, epoch, b)
                elif group is None:
                    h_pos, t_pos, h_neg, t_neg = step(idx, kinds, torch.tensor(m, device=device, dtype=params[0].dtype))
                    value, parts = split_loss(h_pos, h_neg, head.weight, t_pos, t_neg, reduction=reduction,
                                              lm_head_bias=head.bias, logit_softcap=softcap,
                                              return_parts=True, shift=False, **hp)
                    objective, value = value, float(value.detach())  # the one read of the step
                    if not math.isfinite(value):
                        _raise_bad_pair(pairs, idx, h_pos, t_pos, h_neg, t_neg, head, softcap, epoch, b)
                    stats = {k: float(parts[k].mean()) for k in ("pos", "neg", "pref_log_odds")}
                else:
                    # This rank's pairs of the global batch, spread by their tokens; a rank with none of them runs
                    # the batch's first pair at weight 0, since every rank must take part in DDP's backward.
                    own = dist.shard_by_work([work[i] for i in idx], group)
                    sel = own or [None]
                    local = [idx[j] if j is not None else idx[0] for j in sel]
                    out = step(local, [kinds[j] if j is not None else "add" for j in sel],
                               torch.tensor([m[j] if j is not None else 1.0 for j in sel], device=device,
                                            dtype=params[0].dtype))
                    objective, value, stats = _global_loss(*out, head, softcap, hp, reduction, len(idx), group,
                                                           empty=not own)
                    if not math.isfinite(value):  # every rank sees the global value: every rank stops here
                        if not own:
                            raise RuntimeError(f"the SPLIT loss is not finite at epoch {epoch + 1}, batch {b + 1} "
                                               "(the bad pair is on another rank)")
                        _raise_bad_pair(pairs, local, *out, head, softcap, epoch, b)
                (objective / grad_accum).backward()
                if (b + 1) % grad_accum == 0 or b + 1 == n_batches:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    steps += 1
                stats["loss"] = value
                for k in sums:
                    sums[k] += stats[k]
                bar.set_postfix({"loss": f"{stats['loss']:.3f}", "L_pos": f"{stats['pos']:.3f}",
                                 "L_neg": f"{stats['neg']:.3f}", "pref": f"{stats['pref_log_odds']:+.3f}"})
            history.append({k: v / n_batches for k, v in sums.items()} | {"epoch": epoch + 1})
            if checkpoint_dir and main:
                state = {"epoch": epoch + 1, "params": steering.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "config": config, "history": history, "steps": steps}
                dist.atomic_write(os.path.join(checkpoint_dir, f"checkpoint-epoch{epoch + 1}.pt"),
                                  lambda path: torch.save(state, path))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    steering.objective = loss
    return {"history": history, "steps": steps}

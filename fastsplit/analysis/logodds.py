"""Preference and utility log-odds over steering strength (arXiv 2602.02343, §3).

From the summed NLLs L_p, L_n of the positive and negative completions under teacher forcing:
  PrefOdds = L_n − L_p,   UtilOdds = log((e^−L_p + e^−L_n) / (1 − e^−L_p − e^−L_n)).

``logodds_sweep`` is the fast path: the layers below the intervention run once per pair (the prompt
once for both completions), and so does the steered layer where its output is affine in m; all m ride in
one batch with per-row m, the prompt runs once per m (its KV cache serves both completions; at the last
layer it only writes keys and values), and logits are taken at completion positions only. The prompts'
shared prefix (a chat template's header, an instruction) runs once per m for the whole sweep.
``logodds_naive`` is the plain loop (oracle, baseline).
"""
from __future__ import annotations

import copy
import csv
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import dist, hf
from ..data import Pair, encode_pair
from ..ops._checks import check_strengths
from ..ops.split_loss import split_loss_fwd_torch

__all__ = ["Sweep", "logodds_sweep", "logodds_sweep_vllm", "logodds_naive", "util_odds"]

_UTIL_EPS = 1e-6  # the utility denominator is floored at this probability mass


def util_odds(nll_pos, nll_neg):
    """UtilOdds from summed NLLs, computed stably; returns (values, clamped).

    log(e^−Lp + e^−Ln) is a logaddexp; the denominator log(1 − e^a) is log1mexp. Where the two
    "probabilities" reach a total of 1 (possible with length-normalised NLLs) the denominator would
    be ≤ 0: there the value is clamped to the floor ``_UTIL_EPS`` and flagged, never NaN.
    """
    a = np.logaddexp(-np.asarray(nll_pos, dtype=np.float64), -np.asarray(nll_neg, dtype=np.float64))
    cap = math.log1p(-_UTIL_EPS)
    clamped = a > cap
    a = np.minimum(a, cap)
    log1mexp = np.where(a > -math.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))
    return a - log1mexp, clamped


@dataclass
class Sweep:
    """Log-odds of N pairs at M strengths. Arrays: ``multipliers`` [M]; ``nll_pos``, ``nll_neg``,
    ``pref_odds``, ``util_odds``, ``util_clamped`` [N, M]. ``groups`` [N]: each pair's answer group, the first
    token of its positive completion as scored (or None)."""

    multipliers: np.ndarray
    nll_pos: np.ndarray
    nll_neg: np.ndarray
    pref_odds: np.ndarray
    util_odds: np.ndarray
    util_clamped: np.ndarray
    length_norm: bool = False
    groups: list[str] | None = None
    extra: dict | None = None  # further per-(pair, m) columns [N, M], e.g. the manifold measures (sweep --manifold)

    @classmethod
    def from_nll(cls, multipliers, nll_pos, nll_neg, length_norm=False, groups=None) -> "Sweep":
        nll_pos, nll_neg = np.asarray(nll_pos, np.float64), np.asarray(nll_neg, np.float64)
        util, clamped = util_odds(nll_pos, nll_neg)
        if groups is not None and len(groups) != nll_pos.shape[0]:
            raise ValueError(f"groups has {len(groups)} labels for {nll_pos.shape[0]} pairs")
        return cls(np.asarray(multipliers, np.float64), nll_pos, nll_neg, nll_neg - nll_pos, util, clamped,
                   length_norm, None if groups is None else list(groups))

    def summary(self) -> dict[str, np.ndarray]:
        """Per-m mean and standard error of the preference and utility log-odds (arrays [M])."""
        n = self.pref_odds.shape[0]
        se = lambda x: x.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(x.shape[1])
        return {"multiplier": self.multipliers, "pref_mean": self.pref_odds.mean(0), "pref_se": se(self.pref_odds),
                "util_mean": self.util_odds.mean(0), "util_se": se(self.util_odds),
                "util_clamped": self.util_clamped.sum(0)}

    @classmethod
    def from_csv(cls, path: str) -> "Sweep":
        """Read a ``sweep.csv`` written by :meth:`to_csv` back (pairs × multipliers; every cell must be there).
        Extra columns (``--manifold``'s) go to :attr:`extra` as [N, M] arrays."""
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"pair", "multiplier", "nll_pos", "nll_neg"}
        if not rows or not need <= set(rows[0]):
            raise ValueError(f"{path} is not a sweep.csv (needs the columns {sorted(need)})")
        pairs = sorted({int(r["pair"]) for r in rows})
        ms = sorted({float(r["multiplier"]) for r in rows})
        if pairs != list(range(len(pairs))) or len(rows) != len(pairs) * len(ms):
            raise ValueError(f"{path} does not hold every (pair, multiplier) cell once: {len(rows)} rows for "
                             f"{len(pairs)} pairs x {len(ms)} multipliers")
        col = {m: j for j, m in enumerate(ms)}
        base = {"pair", "group", "multiplier", "nll_pos", "nll_neg", "pref_odds", "util_odds", "util_clamped"}
        extra_names = [k for k in rows[0] if k not in base]
        nll = np.zeros((len(pairs), len(ms), 2))
        extra = {k: np.zeros((len(pairs), len(ms))) for k in extra_names}
        groups = [""] * len(pairs)
        for r in rows:
            i, j = int(r["pair"]), col[float(r["multiplier"])]
            nll[i, j] = float(r["nll_pos"]), float(r["nll_neg"])
            groups[i] = r.get("group", "")
            for k in extra_names:
                extra[k][i, j] = float(r[k])
        sweep = cls.from_nll(ms, nll[..., 0], nll[..., 1], groups=groups if any(groups) else None)
        sweep.extra = extra
        return sweep

    def to_csv(self, path: str) -> None:
        """Long format, one row per (pair, multiplier). Columns: ``pair`` (index in the swept list), ``group`` (the
        positive completion's first token as scored), ``multiplier`` (m), ``nll_pos`` / ``nll_neg`` (summed NLL in
        nats of the positive / negative completion; token means with ``length_norm``), ``pref_odds``
        (L_n − L_p), ``util_odds`` (the utility log-odds), ``util_clamped`` (1 where its denominator was floored).
        ``multiplier``, ``nll_pos`` and ``nll_neg`` are written exactly (shortest round-trip form), so
        :meth:`from_csv` gives back the very sweep and a re-analysis the figures of its ``fit.json``: the bootstrap's
        refits of a weakly identified curve move by 1e-3 under input changes of 1e-7; the derived columns have 8
        digits."""
        extra = self.extra or {}
        exact = lambda v: repr(float(v))  # float(): numpy 2's repr of a scalar names its type
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pair", "group", "multiplier", "nll_pos", "nll_neg", "pref_odds", "util_odds", "util_clamped",
                        *extra])
            for i in range(self.nll_pos.shape[0]):
                for j, m in enumerate(self.multipliers):
                    w.writerow([i, self.groups[i] if self.groups else "", exact(m), exact(self.nll_pos[i, j]),
                                exact(self.nll_neg[i, j]), f"{self.pref_odds[i, j]:.8g}", f"{self.util_odds[i, j]:.8g}",
                                int(self.util_clamped[i, j]), *(f"{v[i, j]:.8g}" for v in extra.values())])


def _check(pairs, multipliers):
    if not pairs:
        raise ValueError("pairs is empty")
    return check_strengths("multipliers", multipliers)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def _decoder_pass(model, steering: hf.Steering, m_rows, hidden_in, start, **kw):
    with steering.multiplier(m_rows):
        return hf.last_hidden(model, hidden_in, start=start, **kw)


def _capture(model, steering: hf.Steering, start: int, ids, mask, pos, cache):
    """The input of decoder layer ``start`` [N, T, H] and, when ``start`` is past the steered layer, its
    derivative in m (else None): the input at m is ``h + m·d``, so layers <= L run once for all m."""
    if start <= steering.layer:
        return hf.capture_layer_input(model, start, ids, mask, pos, cache), None
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["y0"] = args[0], out

    handle = steering.module.register_forward_hook(hook)
    try:
        with steering.multiplier(0.0):
            h0 = hf.capture_layer_input(model, start, ids, mask, pos, cache)
    finally:
        handle.remove()
    with steering.multiplier(1.0):
        d = steering.module(seen["x"]) - seen["y0"]  # ΔW·x + Δb, from the module itself (every form)
    return h0, d


def _at(h, d, m_rows):
    """Layer inputs at per-row m: ``h + m·d`` [N, T, H] (``h`` itself when it does not depend on m)."""
    if h is None or d is None:
        return h
    return torch.addcmul(h, m_rows.to(h.dtype)[:, None, None], d)


@torch.no_grad()
def logodds_sweep(model, tokenizer, steering: hf.Steering, pairs: Sequence[Pair], multipliers: Sequence[float], *,
                  length_norm: bool = False, batch_size: int | None = None, chat: bool = True,
                  progress: bool = True, group=None, checkpoint_dir: str | None = None, resume: bool = False) -> Sweep:
    """Teacher-forced NLLs of every pair's two completions at every multiplier, fast; returns a :class:`Sweep`.

    ``batch_size`` is the number of pairs per batch (each becomes M rows). The default holds about 48 rows
    on the CPU, where cache-sized GEMMs run fastest (measured: 2 pairs × 21 m took 0.55× the time of 8 × 21),
    and about 512 on a GPU.
    With ``length_norm=True`` the NLLs are token means. Tokenisation is :func:`fastsplit.encode_pair`'s.

    Inside an initialised process group (``torchrun``; or ``group=``) the ranks take batches of pairs of similar
    lengths, costliest first, from a shared counter (:func:`fastsplit.dist.run_tasks`), so the work follows how fast
    each rank runs; the m rows of the prompts' shared prefix are shared out too (each rank runs a block of them; the
    keys and values are gathered), and every rank returns the whole sweep, in the input order.

    ``checkpoint_dir``: each batch of finished pairs is written there as a block (:class:`fastsplit.dist.Blocks`,
    with the steering's digest, the pairs' digest and the multipliers); with ``resume=True`` the pairs found there
    are not swept again (a block of another steering, data set or grid is refused), without it old blocks are
    removed first. The result equals an uninterrupted sweep's.

    Example::

        >>> sweep = logodds_sweep(model, tok, steering, test_pairs, np.linspace(-8, 8, 21))
        >>> sweep.summary()["pref_mean"]
    """
    ms = _check(pairs, multipliers)
    pairs = list(pairs)
    group = dist.active_group(group)
    dist.check_world(len(pairs), "pairs", group)
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]  # every rank: a bad pair stops each before any work
    groups = _groups(tokenizer, enc)
    done, blocks = {}, None
    if checkpoint_dir:
        from ..data import pairs_digest

        header = {"steering": steering.digest(), "pairs": pairs_digest(pairs), "multipliers": ms,
                  "length_norm": bool(length_norm), "chat": bool(chat)}
        blocks = dist.Blocks(checkpoint_dir, header, "log-odds sweep", group)
        done = blocks.load() if resume else blocks.clear()
    todo = [i for i in range(len(pairs)) if i not in done]
    longest = max(len(p) for p, _, _ in enc) + max(max(len(a), len(b)) for _, a, b in enc)
    c = 0 if hf.window_shorter_than(model, longest) else _shared_prefix([p for p, _, _ in enc])

    def write(positions, nll):  # a finished batch: positions in todo
        if blocks is not None:
            blocks.write({todo[k]: row.tolist() for k, row in zip(positions, nll)})

    new = {}
    # Every pass below has a padding mask; on the CPU, grouped-query heads are read in place, not copied per head
    with hf.gqa_attention(model):
        # The shared prefix's m rows are shared out too (every rank needs its whole cache): with 2 ranks it was about
        # 3 pairs' work of 32 on each (bench_distributed's 110-token instruction, 21 m).
        caches = (_shared_prefix_caches(model, steering, enc[0][0][:c], ms, group) if todo and c and group is not None
                  else None)
        if todo:  # every rank takes batches until none is left, and gets every batch's NLLs back
            swept = _sweep_nll(model, steering, [enc[i] for i in todo], ms, pad=hf.pad_id_of(tokenizer),
                               length_norm=length_norm, batch_size=batch_size,
                               progress=progress and dist.is_main(group), prefix=c, caches=caches, on_batch=write,
                               group=group)
            new = dict(zip(todo, swept.tolist()))
    rows = [done[i] if i in done else new[i] for i in range(len(pairs))]
    nll = np.asarray(rows, np.float64)
    return Sweep.from_nll(ms, nll[..., 0], nll[..., 1], length_norm, groups)


def _shared_prefix(prompts) -> int:
    """How many leading tokens every prompt shares, leaving each prompt at least its last token (the tail
    pass needs it: it predicts the first completion token)."""
    return max(0, min(len(os.path.commonprefix(list(prompts))), min(len(p) for p in prompts) - 1))


def _sweep_nll(model, steering, enc, ms, *, pad, length_norm, batch_size, progress, prefix: int, caches=None,
               on_batch=None, group=None) -> np.ndarray:
    """Summed (or mean) NLLs [N, M, 2] of the encoded pairs' two completions at every m: the fast path.

    A prompt row is [shared prefix | left-padded rest of the prompt | right-padded completion], and runs in
    three stages, each on the KV cache of the one before: the prefix every prompt shares (the chat template's
    header, an instruction) once per m for the whole sweep; the rest of each prompt but its last token once per
    (pair, m); the prompt's last token and one completion once per (pair, m, side). ``prefix``: how many leading
    tokens the prompts share (:func:`logodds_sweep` decides; 0 runs no prefix stage). ``caches``: the prefix's
    (below, above) caches when the caller made them (:func:`_shared_prefix_caches`).

    The pairs go in batches of similar lengths (:func:`_batches`); under a process group (``group``) the ranks take
    the batches one at a time, costliest first, from a shared counter (:func:`fastsplit.dist.run_tasks`), so a rank
    whose core runs slower in this run takes fewer, and every rank returns every pair's NLLs. ``on_batch(idx, nll)``:
    a finished batch (positions in ``enc``, NLLs [b, M, 2]), on the rank that ran it."""
    from tqdm.auto import tqdm

    M = len(ms)
    device = next(model.parameters()).device
    per = batch_size or max(1, (512 if device.type == "cuda" else 48) // M)
    c = prefix
    # Single pairs at the end on the CPU only, where a pair alone runs as fast per pair as two together; a GPU's batch
    # of one pair would leave it mostly idle (its ranks end within one full batch of each other instead).
    batches = _batches(enc, per, c, split_last=dist.world_size(group) if group is not None and device.type == "cpu"
                       else 0)
    # The bar counts pairs (each is 2·M sequences) finished on every rank, so it moves with the work.
    bar = tqdm(total=len(enc), desc=f"log-odds sweep ({M} m)", unit="pair", disable=not progress, leave=False)
    ctx = {}

    def setup():  # inside run_tasks: an error here stops every rank, as one in a batch does
        m_all, start, last = _layout(model, steering, ms)
        pre = caches if caches is not None or not c else _prefix_caches(model, steering, enc[0][0][:c], m_all, start,
                                                                         last)
        ctx.update(m_all=m_all, start=start, last=last, caches=pre if c else (None, None), head=hf.lm_head(model),
                   softcap=hf.logit_softcap(model))

    def run(k):
        idx = batches[k]
        rows = _batch_nll(model, steering, [enc[i] for i in idx], c, pad=pad, length_norm=length_norm, **ctx)
        if on_batch is not None:
            on_batch(idx, rows)
        return rows

    done = dist.run_tasks(run, len(batches), group, what="log-odds sweep", before=setup,
                          sizes=[len(b) for b in batches],  # every rank counts its batches, bar or not
                          on_done=lambda k, finished: bar.update(int(finished) - bar.n))
    bar.close()
    nll = np.zeros((len(enc), M, 2))
    for idx, rows in zip(batches, done):
        nll[idx] = rows
    return nll


def _batches(enc, per: int, c: int, split_last: int = 0) -> list[list[int]]:
    """Positions of ``enc`` in batches of ``per`` pairs of similar lengths, the costliest batch first (padded tokens
    after the shared prefix ``c``: the rest of the prompt once, the last prompt token and a completion twice); the
    last ``split_last`` batches go as one pair each.

    A batch pads every prompt to its longest (bench_distributed's pairs in input order, 2 a batch: 6.8% of the
    prompts' tokens after the prefix were padding; sorted by length, 0.5%). Costliest first, and small at the end:
    ranks taking batches from a counter then finish within about one pair's work of each other."""
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i][0]), max(len(enc[i][1]), len(enc[i][2]))))
    batches = [order[s:s + per] for s in range(0, len(order), per)]

    def cost(idx):
        rest = max(len(enc[i][0]) for i in idx) - c
        comp = max(max(len(enc[i][1]), len(enc[i][2])) for i in idx)
        return len(idx) * (rest + 2 * (1 + comp))
    batches.sort(key=cost, reverse=True)  # stable: equal costs keep their length order
    cut = len(batches) - min(split_last, len(batches))
    return batches[:cut] + sorted(([i] for b in batches[cut:] for i in b), key=cost, reverse=True)


def _batch_nll(model, steering, chunk, c: int, *, pad, length_norm, m_all, start, last, caches, head,
               softcap) -> np.ndarray:
    """NLLs [b, M, 2] of one batch of encoded pairs (:func:`_sweep_nll`'s three stages). Rows are m-major, so the
    prefix cache [M] repeats into (m, pair) and then (m, pair, side) rows by interleaving."""
    M, device = m_all.shape[0], m_all.device
    pre_below, pre_above = caches
    b = len(chunk)
    S = max(len(p) for p, _, _ in chunk) - c  # the longest rest of a prompt (>= 1: its last token)
    Tp, Tq = c + S, c + S - 1
    Tc = max(max(len(a), len(n)) for _, a, n in chunk)
    # Rows (pair, side): the shared prefix, the rest of the prompt left-padded to S, the completion
    # right-padded to Tc. Positions count real tokens, so padding in the middle changes nothing.
    rest = hf.pad_rows([p[c:] for p, _, _ in chunk for _ in range(2)], pad, left=True, length=S)
    comps = hf.pad_rows([comp for _, a, n in chunk for comp in (a, n)], pad, length=Tc)
    pre = [torch.tensor([chunk[0][0][:c]] * 2 * b, dtype=torch.long), torch.ones(2 * b, c, dtype=torch.long)]
    ids, mask = (torch.cat([a, r, z], dim=1).view(b, 2, Tp + Tc).to(device) for a, r, z in zip(pre, rest, comps))
    pos = _positions(mask.flatten(0, 1)).view(b, 2, -1)
    # Body: the rest of the prompt but its last token, shared by both sides (its mask spans the prefix too).
    # Tail: the prompt's last token and one completion; each side runs it on the body's KV cache. Only the
    # tails' outputs are read, so the prefix's and body's last layer need only write keys and values.
    body = lambda t: t[:, 0, c:Tq]  # [b, Tq - c]
    tail = lambda t: t[:, :, Tq:].flatten(0, 1)  # [2b, 1 + Tc], rows (pair, side)
    h_body = d_body = h_tail = d_tail = None
    if start > 0:  # the layers below the first m-dependent one: once per pair, whatever M is
        below = _copy_rows(pre_below, b) if c else hf.new_cache(model)
        if Tq > c:
            h_body, d_body = _capture(model, steering, start, body(ids), mask[:, 0, :Tq], body(pos), below)
        if Tq:
            hf.repeat_rows(below, 2)
        h_tail, d_tail = _capture(model, steering, start, tail(ids), mask.flatten(0, 1), tail(pos), below)
    # Body pass: rows (m, pair).
    m_body = m_all.repeat_interleave(b)
    tile = lambda t: None if t is None else t.repeat(M, *[1] * (t.dim() - 1))  # rows (pair..) -> (m, pair..)
    cache = _copy_rows(pre_above, b) if c else hf.new_cache(model)
    if Tq > c:
        with hf.keys_values_only(model, last):
            _decoder_pass(model, steering, m_body, _at(tile(h_body), tile(d_body), m_body), start,
                          input_ids=tile(body(ids)), attention_mask=tile(mask[:, 0, :Tq]),
                          position_ids=tile(body(pos)), cache=cache)
        if start > 0:
            hf.alias_skipped(cache, start)
    if Tq:
        hf.repeat_rows(cache, 2)
    # Tail pass: rows (m, pair, side); the body's cache serves both sides.
    tail_ids, m_tail = tile(tail(ids)), m_all.repeat_interleave(2 * b)
    h_comp = _decoder_pass(model, steering, m_tail, _at(tile(h_tail), tile(d_tail), m_tail), start,
                           input_ids=tail_ids, attention_mask=tile(mask.flatten(0, 1)),
                           position_ids=tile(tail(pos)), cache=cache)
    # Completion token t is predicted at tail position t (position 0 is the prompt's last token).
    targets, valid = tail_ids[:, 1:], tile(tail(mask))[:, 1:].bool()
    h_pred = h_comp[:, :-1]
    tok_nll, _, _ = split_loss_fwd_torch(h_pred[valid], targets[valid], head.weight, head.bias, softcap, False)
    row_nll = torch.zeros(valid.shape[0], device=device, dtype=tok_nll.dtype)
    row_nll.index_add_(0, valid.nonzero()[:, 0], tok_nll)
    if length_norm:
        row_nll = row_nll / valid.sum(1)
    return row_nll.view(M, b, 2).transpose(0, 1).double().cpu().numpy()


def _layout(model, steering, ms):
    """The multipliers as a tensor [M] on the model's device, the first layer whose input depends on m, and the
    last layer."""
    m_all = torch.tensor(ms, device=next(model.parameters()).device, dtype=next(steering.module.parameters()).dtype)
    L = steering.layer
    start = L + 1 if hf.affine_in_m(model, L, steering.site) else L
    return m_all, start, len(hf.decoder_layers(model)) - 1


def _prefix_caches(model, steering, prefix: list[int], m_all, start: int, last: int):
    """The KV caches of the prompts' shared prefix, once for the whole sweep: below the first m-dependent layer
    (one row; None when there is no such layer) and from it up (one row per m of ``m_all``, m-major; empty when
    ``m_all`` is)."""
    device, M = m_all.device, m_all.shape[0]
    ids = torch.tensor([prefix], device=device)
    mask, pos = torch.ones_like(ids), torch.arange(len(prefix), device=device)[None]
    below = h = d = None
    if start > 0:
        below = hf.new_cache(model)
        h, d = _capture(model, steering, start, ids, mask, pos, below)
    rows = lambda t: None if t is None else t.expand(M, *t.shape[1:])
    above = hf.new_cache(model)
    if M:
        with hf.keys_values_only(model, last):
            _decoder_pass(model, steering, m_all, _at(rows(h), rows(d), m_all), start, input_ids=rows(ids),
                          attention_mask=rows(mask), position_ids=rows(pos), cache=above)
    if start > 0 and M:
        hf.alias_skipped(above, start)
    return below, above


def _shared_prefix_caches(model, steering, prefix: list[int], ms, group):
    """:func:`_prefix_caches` of all of ``ms`` on every rank of ``group``, each rank having run a contiguous block of
    the m rows (:func:`fastsplit.dist.shard_range`; the part below the first m-dependent layer, one row, on every
    rank): the blocks' keys and values travel through one ``all_gather`` and are stacked in rank order."""
    m_all, start, last = _layout(model, steering, ms)
    rows = dist.shard_range(len(ms), group)
    below, part = dist.agree(lambda: _prefix_caches(model, steering, prefix, m_all[rows.start:rows.stop], start,
                                                    last), group, what="log-odds sweep's shared prefix")
    me = dist.rank(group)
    got = dist.gather_tensors({f"{me}/{i}/{j}": t for i, kv in hf.layer_states(part, start).items()
                               for j, t in enumerate(kv)}, group, what="log-odds sweep's shared prefix",
                              device=m_all.device)  # also on a rank that ran no m rows
    states = {}
    for i in range(start, last + 1):
        states[i] = tuple(torch.cat([got[k] for r in range(dist.world_size(group)) if (k := f"{r}/{i}/{j}") in got])
                          for j in (0, 1))
    above = hf.cache_of(model, states)
    if start > 0:
        hf.alias_skipped(above, start)
    return below, above


def _copy_rows(cache, repeats: int):
    """A copy of ``cache`` with each row repeated ``repeats`` times, interleaved (the original is kept for the
    next chunk)."""
    out = copy.deepcopy(cache)
    hf.repeat_rows(out, repeats)
    return out


def _groups(tokenizer, enc) -> list[str]:
    """Each pair's answer group: its positive completion's first token, as scored."""
    return [tokenizer.decode(pos[:1]) for _, pos, _ in enc]


@torch.no_grad()
def logodds_naive(model, tokenizer, steering: hf.Steering, pairs: Sequence[Pair], multipliers: Sequence[float], *,
                  length_norm: bool = False, chat: bool = True, progress: bool = True) -> Sweep:
    """The plain loop: one full forward per (m, pair, completion), full-vocabulary logits. Oracle and baseline."""
    from tqdm.auto import tqdm

    ms = _check(pairs, multipliers)
    device = next(model.parameters()).device
    nll = np.zeros((len(pairs), len(ms), 2))
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
    for j, m in enumerate(tqdm(ms, desc="naive log-odds", disable=not progress, leave=False)):
        with steering.multiplier(m):
            for i, (p, c, n) in enumerate(enc):
                for k, comp in enumerate((c, n)):
                    ids = torch.tensor([p + comp], device=device)
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
                    tok = -logp.gather(1, torch.tensor(comp, device=device)[:, None]).squeeze(1)
                    nll[i, j, k] = float(tok.mean() if length_norm else tok.sum())
    return Sweep.from_nll(ms, nll[..., 0], nll[..., 1], length_norm, _groups(tokenizer, enc))


def logodds_sweep_vllm(engine, tokenizer, pairs: Sequence[Pair], multipliers: Sequence[float], *,
                       steering: str | None = None, length_norm: bool = False, chat: bool = True,
                       progress: bool = True) -> Sweep:
    """:func:`logodds_sweep` on a vLLM engine (:class:`fastsplit.vllm.Engine` with the steering registered under the
    name ``steering``): every (pair, completion, m) is one request, all submitted together, scored from
    ``prompt_logprobs``; the same :class:`Sweep` as the torch engine (within 1e-3 nats per completion in fp32,
    ``tests/test_vllm.py``). Tokenisation is :func:`fastsplit.encode_pair`'s.

    Example::

        >>> engine = fastsplit.vllm.Engine(folder, {"opt": "run/steering.safetensors"}, dtype="float32")
        >>> sweep = logodds_sweep_vllm(engine, tok, test_pairs, range(-10, 11), steering="opt")
    """
    ms = _check(pairs, multipliers)
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
    rows = [(p, a) for p, a, _ in enc] + [(p, b) for p, _, b in enc]
    nll = engine.score(rows, ms, steering=steering, length_norm=length_norm, progress=progress)
    n = len(enc)
    return Sweep.from_nll(ms, nll[:n], nll[n:], length_norm, _groups(tokenizer, enc))

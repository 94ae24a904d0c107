"""The transformers engine: fastsplit's fast paths on a Hugging Face model with one steering attached.

``score`` runs the sweep's fast path: the layers below the intervention once per prompt (the prompt once for both
completions that share it), and the steered layer once where its output is affine in m; all m ride in one batch with
per-row m, the prompt runs once per m (its KV cache serves every completion; its last layer only writes keys and
values), and logits are taken at completion positions only. The prompts' shared prefix (a chat template's header, an
instruction) runs once per m for the whole sweep. Inside a process group (``torchrun``) the ranks take batches from
a shared counter and every rank returns everything (:mod:`fastsplit.dist`).

``generate`` decodes many (prompt, m) rows together with per-row m and left padding.

Example::

    >>> engine = TransformersEngine(model, tok, fastsplit.load_steering(model, "run/steering.safetensors"))
    >>> engine.score([(prompt_ids, completion_ids)], [-4, 0, 4])     # [1, 3]
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch

from .. import dist, hf
from ..ops.split_loss import split_loss_fwd_torch

__all__ = ["TransformersEngine"]


class TransformersEngine:
    """A transformers model ``model`` with the steering ``steering`` attached (:func:`fastsplit.load_steering`), and
    its ``tokenizer``. ``group``: the process group to share the work over (default: the one ``torchrun`` started,
    if any)."""

    name = "transformers"
    supports_hidden_states = True

    def __init__(self, model, tokenizer, steering: hf.Steering, *, group=None):
        self.model, self.tokenizer, self.steering, self._group = model, tokenizer, steering, group

    @property
    def group(self):
        return dist.active_group(self._group)

    def digest(self) -> str:
        return self.steering.digest()

    @torch.no_grad()
    def score(self, rows, multipliers, *, length_norm=False, batch_size=None, progress=True, on_rows=None):
        """NLLs [len(rows), M]. Consecutive rows with the same prompt (a pair's two completions) share one prompt
        pass. ``batch_size``: prompts per batch (each becomes M rows; default about 48 rows on the CPU, 512 on a
        GPU). ``on_rows(row_indices, nll [k, M])``: a finished batch, on the rank that ran it."""
        if not len(rows):
            raise ValueError("rows is empty")
        ms = [float(m) for m in multipliers]
        triples, owners = _triples(rows)
        group = self.group
        model, steering = self.model, self.steering
        longest = max(len(p) for p, _, _ in triples) + max(max(len(a), len(b)) for _, a, b in triples)
        c = 0 if hf.window_shorter_than(model, longest) else _shared_prefix([p for p, _, _ in triples])

        def write(positions, nll):
            if on_rows is not None:
                idx = [r for k in positions for r in owners[k]]
                on_rows(idx, np.concatenate([nll[j, :, :len(owners[k])].T for j, k in enumerate(positions)]))

        # Every pass below has a padding mask; on the CPU, grouped-query heads are read in place, not copied per head
        with hf.gqa_attention(model):
            # The shared prefix's m rows are shared out too (every rank needs its whole cache): with 2 ranks it was
            # about 3 pairs' work of 32 on each (bench_distributed's 110-token instruction, 21 m).
            caches = (_shared_prefix_caches(model, steering, triples[0][0][:c], ms, group) if c and group is not None
                      else None)
            nll = _sweep_nll(model, steering, triples, ms, pad=hf.pad_id_of(self.tokenizer), length_norm=length_norm,
                             batch_size=batch_size, progress=progress and dist.is_main(group), prefix=c, caches=caches,
                             on_batch=write, group=group)
        out = np.zeros((len(rows), len(ms)))
        for k, own in enumerate(owners):
            for side, r in enumerate(own):
                out[r] = nll[k, :, side]
        return out

    def generate(self, prompts, multipliers, *, max_new_tokens=32, do_sample=False, batch_size=None, progress=True,
                 on_prompts=None, **generate_kwargs):
        """Texts ``[prompt][m]``, outputs decoded with ``skip_special_tokens=True``. Rows of many (prompt, m) are
        decoded together (``batch_size`` rows per ``generate`` call; default all of them, at most 256); greedy
        outputs equal running each m alone under ``steering.multiplier(m)``. Under a process group the prompts are
        spread over the ranks by their work and every rank returns all the texts. ``on_prompts({index: texts})``:
        each finished call's prompts, on the rank that ran them."""
        ms = [float(m) for m in multipliers]
        group = self.group
        encoded = [list(p) for p in prompts]
        mine = dist.shard_by_work([len(p) + max_new_tokens for p in encoded], group)
        local = dist.agree(lambda: _generate(self.model, self.tokenizer, self.steering, mine, encoded, ms,
                                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                                             batch_size=batch_size, progress=progress and dist.is_main(group),
                                             on_block=on_prompts, **generate_kwargs), group, what="generation sweep")
        return dist.gather_indexed(local, len(encoded), group, what="generation sweep")


def _triples(rows) -> tuple[list[tuple[list[int], list[int], list[int]]], list[list[int]]]:
    """The rows as the fast path's (prompt, completion a, completion b) triples: two consecutive rows with the same
    prompt share one; a row alone is paired with itself. Returns (triples, the row indices each holds)."""
    triples, owners, k = [], [], 0
    while k < len(rows):
        p, a = list(rows[k][0]), list(rows[k][1])
        if not p or not a:
            raise ValueError(f"row {k} has an empty prompt or completion")
        if k + 1 < len(rows) and list(rows[k + 1][0]) == p and len(rows[k + 1][1]):
            triples.append((p, a, list(rows[k + 1][1])))
            owners.append([k, k + 1])
            k += 2
        else:
            triples.append((p, a, a))
            owners.append([k])
            k += 1
    return triples, owners


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

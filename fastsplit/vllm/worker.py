"""The worker side of the vLLM plugin: the steered down_proj modules and the per-token strength buffers.

:func:`install` runs once per model runner, after its model loads (see :mod:`fastsplit.vllm.plugin`).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..ops.steered_linear import steered_linear
from .internals import moved
from .protocol import ENV, request_steering

log = logging.getLogger("fastsplit")


class SteeredDownProj(nn.Module):
    """Stands in for a vLLM ``down_proj`` (a RowParallelLinear): the base layer plus each registered steering's
    update, each at its per-token strengths ``buffer[:tokens]`` [max tokens] (filled before every step).

    With one tensor-parallel rank and a plain unquantized weight the first update is fused into the base GEMM
    (``steered_linear(x, W, b, ΔW..., m1=m)``); otherwise (vLLM's CPU build repacks weights for its own GEMMs;
    quantized or sharded layers) the base layer runs as vLLM has it and the updates are
    added (``steered_linear(x, None, ...)``; under tensor parallelism the input is this rank's shard, so ΔW's
    columns are sharded alike and the partial products are all-reduced, and Δb is added once after)."""

    def __init__(self, base: nn.Module, steerings: list[dict]):
        super().__init__()
        self.base, self.steerings = base, steerings
        method = type(getattr(base, "quant_method", None)).__name__
        self.tp = int(getattr(base, "tp_size", 1))
        w = getattr(base, "weight", None)
        # vLLM's CPU build repacks weights for its own GEMMs (weight then holds no [N, K] matrix): fuse only into a
        # plain weight
        self.fused = (self.tp == 1 and method == "UnquantizedLinearMethod" and isinstance(w, torch.Tensor)
                      and w.dim() == 2 and w.numel() > 0 and not getattr(base, "skip_bias_add", False))
        self.return_bias = bool(getattr(base, "return_bias", False))

    def forward(self, x):
        n = x.shape[0]
        rest = self.steerings
        if self.fused:
            s = rest[0]
            y = steered_linear(x, self.base.weight, self.base.bias, delta_weight=s["delta_weight"],
                               lora_a=s["lora_a"], lora_b=s["lora_b"], delta_bias=s["delta_bias"],
                               m1=s["m"][:n])
            rest = rest[1:]
        else:
            y = self.base(x)
            y = y[0] if isinstance(y, tuple) else y
        for s in rest:
            y = y + self._update(x, s, s["m"][:n])
        return (y, None) if self.return_bias else y

    def _update(self, x, s, m):
        if self.tp == 1:
            return steered_linear(x, None, delta_weight=s["delta_weight"], lora_a=s["lora_a"], lora_b=s["lora_b"],
                                  delta_bias=s["delta_bias"], m1=m)
        out = None
        if s["delta_weight"] is not None or s["lora_a"] is not None:  # partial sums over this rank's input columns
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(steered_linear(x, None, delta_weight=s["delta_weight"],
                                                                  lora_a=s["lora_a"], lora_b=s["lora_b"], m1=m))
        if s["delta_bias"] is not None:
            db = steered_linear(x[:, :1], None, delta_bias=s["delta_bias"], m1=m)
            out = db if out is None else out + db
        return out


class _State:
    """The strength buffers of one runner and what fills them. ``layers``: {steering name: layer} installed."""

    def __init__(self, names: list[str], buffers: list[torch.Tensor], layers: dict[str, int]):
        self.index = {n: k for k, n in enumerate(names)}
        self.names, self.buffers, self.layers = names, buffers, layers
        self.host = np.zeros((len(names), buffers[0].shape[0]), dtype=np.float32)
        self.filled = 0  # tokens written last step (zeroed before the next)
        self.choices: dict[str, tuple[str | None, float]] = {}  # V2: each live request's (steering, m) by id

    def choose(self, extra_args) -> tuple[str | None, float]:
        return request_steering(extra_args, self.names)

    def fill(self, req_ids, qsl, choice) -> None:
        """Per-token m of every steering: request ``req_ids[i]``'s tokens are ``qsl[i]:qsl[i + 1]`` of the flattened
        batch, and ``choice(req_id)`` is its (steering, m). Tokens past the last request (padding) get m = 0."""
        n = len(req_ids)
        total = int(qsl[n]) if n else 0
        span = max(total, self.filled)
        self.host[:, :span] = 0.0
        for i, rid in enumerate(req_ids):
            name, m = choice(rid)
            if name is not None and m != 0.0:
                self.host[self.index[name], int(qsl[i]):int(qsl[i + 1])] = m
        if span:
            for k, buf in enumerate(self.buffers):
                buf[:span].copy_(torch.from_numpy(self.host[k, :span]), non_blocking=True)
        self.filled = total

    def fill_v1(self, runner) -> None:
        """V1: the step's requests are ``runner.input_batch.req_ids[:num_reqs]``, their layout
        ``runner.query_start_loc.np``, their choice in ``runner.requests[id].sampling_params.extra_args``."""
        batch = runner.input_batch
        n = batch.num_reqs
        self.fill(batch.req_ids[:n], runner.query_start_loc.np,
                  lambda rid: self.choose(getattr(runner.requests[rid].sampling_params, "extra_args", None)))

    def fill_v2(self, input_batch) -> None:
        """V2: the step's ``InputBatch`` (``req_ids``, ``num_reqs``, ``query_start_loc_np``); choices recorded by
        :meth:`add_v2`."""
        n = input_batch.num_reqs
        self.fill(input_batch.req_ids[:n], input_batch.query_start_loc_np,
                  lambda rid: self.choices.get(rid, (None, 0.0)))

    def add_v2(self, scheduler_output) -> None:
        """V2: record the new requests' choices (``scheduled_new_reqs[*].req_id / .sampling_params``)."""
        for new in scheduler_output.scheduled_new_reqs:
            sp = getattr(new, "sampling_params", None)
            self.choices[new.req_id] = self.choose(getattr(sp, "extra_args", None))


def _check_runner(runner, kind: str) -> None:
    need = {"v1": ("model", "input_batch", "query_start_loc", "requests", "max_num_tokens", "_model_forward"),
            "v2": ("model", "max_num_tokens", "prepare_inputs", "add_requests", "_remove_request")}[kind]
    for path in need:
        if not hasattr(runner, path):
            raise moved(f"model runner ({kind}) attribute {path!r}")
    if kind == "v1":
        batch = runner.input_batch
        if not (hasattr(batch, "req_ids") and hasattr(batch, "num_reqs")):
            raise moved("input_batch.req_ids / num_reqs")
        if not hasattr(runner.query_start_loc, "np"):
            raise moved("query_start_loc.np (a CpuGpuBuffer)")


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise moved(f"model.model.layers on {type(model).__name__}")
    return layers


def install(runner, reg: dict, kind: str = "v1") -> None:
    """Replace each steered layer's ``mlp.down_proj`` with a :class:`SteeredDownProj` and wrap the runner so the
    strength buffers are filled before each step (``kind``: its batch layout, "v1" or "v2"). Once per runner."""
    if getattr(runner, "_fastsplit_state", None) is not None:
        return
    from .. import steerfile

    _check_runner(runner, kind)
    device = next(runner.model.parameters()).device
    dtype = next(runner.model.parameters()).dtype
    layers = _layers(runner.model)
    names = list(reg)
    buffers = [torch.zeros(int(runner.max_num_tokens), dtype=torch.float32, device=device) for _ in names]
    by_layer: dict[int, list[dict]] = {}
    for name, buf in zip(names, buffers):
        meta, tensors = steerfile.read_tensors(reg[name])
        L = int(meta["layer"])
        if L >= len(layers):
            raise ValueError(f"{ENV}: {name} steers layer {L}, but this model has {len(layers)} layers")
        mlp = getattr(layers[L], "mlp", None)
        down = getattr(mlp, "down_proj", None)
        if down is None:
            raise moved(f"model.model.layers[{L}].mlp.down_proj on {type(layers[L]).__name__}")
        base = down.base if isinstance(down, SteeredDownProj) else down
        out_f = int(getattr(base, "output_size", 0) or base.weight.shape[0])
        in_f = int(getattr(base, "input_size", 0) or base.weight.shape[1])
        if str(out_f) != meta["hidden_size"] or (meta.get("intermediate_size", "0") not in ("0", str(in_f))):
            raise ValueError(f"{ENV}: {name} was trained on a down_proj {meta.get('intermediate_size')} -> "
                             f"{meta['hidden_size']}, but this model's is {in_f} -> {out_f}")
        entry = {"name": name, "m": buf}
        for key in ("delta_weight", "lora_a", "lora_b", "delta_bias"):
            t = tensors.get(key)
            entry[key] = None if t is None else _shard(t, key, base).to(device=device, dtype=dtype)
        by_layer.setdefault(L, []).append(entry)
    for L, entries in by_layer.items():
        mlp = layers[L].mlp
        base = mlp.down_proj.base if isinstance(mlp.down_proj, SteeredDownProj) else mlp.down_proj
        mlp.down_proj = SteeredDownProj(base, entries)
    state = _State(names, buffers, {e["name"]: L for L, entries in by_layer.items() for e in entries})
    _hook(runner, state, kind)
    runner._fastsplit_state = state
    log.info("fastsplit: steering %s installed at layers %s", ", ".join(names), sorted(by_layer))


def _hook(runner, state: _State, kind: str) -> None:
    """Wrap this runner instance's step so the buffers hold the step's per-token m before its forward."""
    if kind == "v1":
        orig = runner._model_forward

        def _model_forward(*args, **kwargs):
            state.fill_v1(runner)
            return orig(*args, **kwargs)
        runner._model_forward = _model_forward
        return
    prepare, add, remove = runner.prepare_inputs, runner.add_requests, runner._remove_request

    def prepare_inputs(*args, **kwargs):
        batch = prepare(*args, **kwargs)
        state.fill_v2(batch)
        return batch

    def add_requests(scheduler_output, *args, **kwargs):
        out = add(scheduler_output, *args, **kwargs)  # it removes a re-added request first: record after it
        state.add_v2(scheduler_output)
        return out

    def _remove_request(req_id, *args, **kwargs):
        state.choices.pop(req_id, None)
        return remove(req_id, *args, **kwargs)
    runner.prepare_inputs, runner.add_requests, runner._remove_request = prepare_inputs, add_requests, _remove_request


def _shard(t: torch.Tensor, key: str, base) -> torch.Tensor:
    """This tensor-parallel rank's columns of ΔW or A (the input dimension is sharded); the rest whole."""
    tp = int(getattr(base, "tp_size", 1))
    if tp == 1 or key not in ("delta_weight", "lora_a"):
        return t
    rank = int(getattr(base, "tp_rank", 0))
    per = t.shape[1] // tp
    return t[:, rank * per:(rank + 1) * per].contiguous()

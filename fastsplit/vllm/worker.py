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
from .plugin import ENV, request_steering

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
    """The strength buffers of one runner and what fills them."""

    def __init__(self, names: list[str], buffers: list[torch.Tensor]):
        self.index = {n: k for k, n in enumerate(names)}
        self.names, self.buffers = names, buffers
        self.host = np.zeros((len(names), buffers[0].shape[0]), dtype=np.float32)
        self.filled = 0  # tokens written last step (zeroed before the next)

    def fill(self, runner) -> None:
        """Per-token m of every steering from the runner's batch: request i's tokens are
        ``query_start_loc[i]:query_start_loc[i + 1]``, its choice in ``sampling_params.extra_args``."""
        batch = runner.input_batch
        n = batch.num_reqs
        qsl = runner.query_start_loc.np
        total = int(qsl[n]) if n else 0
        span = max(total, self.filled)
        self.host[:, :span] = 0.0
        for i, rid in enumerate(batch.req_ids[:n]):
            sp = runner.requests[rid].sampling_params
            name, m = request_steering(getattr(sp, "extra_args", None), self.names)
            if name is not None and m != 0.0:
                self.host[self.index[name], int(qsl[i]):int(qsl[i + 1])] = m
        if span:
            for k, buf in enumerate(self.buffers):
                buf[:span].copy_(torch.from_numpy(self.host[k, :span]), non_blocking=True)
        self.filled = total


def _check_runner(runner) -> None:
    for path in ("model", "input_batch", "query_start_loc", "requests", "max_num_tokens", "_model_forward"):
        if not hasattr(runner, path):
            raise moved(f"model runner attribute {path!r}")
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


def install(runner, reg: dict) -> None:
    """Replace each steered layer's ``mlp.down_proj`` with a :class:`SteeredDownProj` and wrap the runner's
    ``_model_forward`` so the strength buffers are filled before each step. Once per runner."""
    if getattr(runner, "_fastsplit_state", None) is not None:
        return
    from .. import steerfile

    _check_runner(runner)
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
    state = _State(names, buffers)
    runner._fastsplit_state = state
    orig = runner._model_forward

    def _model_forward(*args, **kwargs):
        state.fill(runner)
        return orig(*args, **kwargs)
    runner._model_forward = _model_forward
    log.info("fastsplit: steering %s installed at layers %s", ", ".join(names), sorted(by_layer))


def _shard(t: torch.Tensor, key: str, base) -> torch.Tensor:
    """This tensor-parallel rank's columns of ΔW or A (the input dimension is sharded); the rest whole."""
    tp = int(getattr(base, "tp_size", 1))
    if tp == 1 or key not in ("delta_weight", "lora_a"):
        return t
    rank = int(getattr(base, "tp_rank", 0))
    per = t.shape[1] // tp
    return t[:, rank * per:(rank + 1) * per].contiguous()

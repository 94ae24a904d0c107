"""Attach a steering intervention to a Hugging Face causal LM, as a handle the user holds.

``attach(model, layer, form)`` swaps layer L's ``mlp.down_proj`` for a :class:`SteeredLinear`
(site="down_proj", the paper's placement) or hooks the decoder layer's output (site="residual").
Nothing is patched globally: ``Steering.detach()`` restores the model exactly.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ... import steerfile
from ...nn import FORMS
from ...ops._checks import Multiplier
from .. import runner
from .layer import ResidualSteer, SteeredLinear

SITES = ("down_proj", "residual")
_FORMAT = steerfile.FORMAT

__all__ = ["Steering", "attach", "load_steering", "SITES"]


class Steering:
    """A steering intervention attached to one layer of a model. Create it with :func:`attach`.

    Example::

        >>> steering = fastsplit.attach(model, layer=15, form="vector")
        >>> with steering.multiplier(torch.tensor([0.0, 2.0])):   # one strength per row
        ...     out = model(input_ids, attention_mask=mask)
        >>> steering.detach()                                     # the model is as it was
    """

    def __init__(self, model: nn.Module, layer: int, form: str, *, rank: int, site: str, backend: str,
                 delta_bias: bool = True):
        self.model, self.layer, self.form, self.site = model, layer, form, site
        self.delta_bias = delta_bias
        self.rank = rank if form == "lora" else None
        target = runner.decoder_layers(model)[layer]
        self._handle = None
        if site == "down_proj":
            mlp = getattr(target, "mlp", None)
            orig = getattr(mlp, "down_proj", None)
            if isinstance(orig, SteeredLinear):
                raise RuntimeError(f"layer {layer}'s mlp.down_proj is already steered; detach that Steering first")
            if not isinstance(orig, nn.Linear):
                raise TypeError(f"layer {layer} has no mlp.down_proj nn.Linear (found {type(orig).__name__})")
            self._original = orig
            self._flags = (orig.weight.requires_grad, orig.bias.requires_grad if orig.bias is not None else None)
            self.module: nn.Module = SteeredLinear.from_linear(orig, form=form, rank=rank, backend=backend,
                                                               delta_bias=delta_bias)
            mlp.down_proj = self.module
        else:
            p = next(target.parameters())
            self.module = ResidualSteer(model.config.hidden_size, form, rank, delta_bias=delta_bias, device=p.device,
                                        dtype=p.dtype)
            self._handle = target.register_forward_hook(self._residual_hook)
        self.module.multiplier = 1.0
        self.objective: str | None = None  # what trained it ("split", "sft", "reps"): set by fastsplit.train, saved
        self.notes: dict[str, str] = {}  # further metadata saved with it (e.g. a difference-of-means vector's norm)
        self._attached = True

    def _residual_hook(self, mod, args, output):
        if isinstance(output, tuple):
            return (self.module(output[0]), *output[1:])
        return self.module(output)

    # --- the handle --------------------------------------------------------------------------
    @contextlib.contextmanager
    def multiplier(self, m: Multiplier, m2: Optional[Multiplier] = None) -> Iterator["Steering"]:
        """Within the block the intervention runs at strength ``m``: a float or a [B] tensor (one per row).
        ``m2`` sets the bias factor separately (default: ``m``)."""
        self._check_attached()
        if isinstance(m, Tensor) and m.dim() > 2:
            raise ValueError(f"multiplier must be a float, [B] or [B, T] tensor, got shape {tuple(m.shape)}")
        old = (self.module.multiplier, self.module.bias_multiplier)
        self.module.multiplier, self.module.bias_multiplier = m, m2
        try:
            yield self
        finally:
            self.module.multiplier, self.module.bias_multiplier = old

    @contextlib.contextmanager
    def nulling(self) -> Iterator["Steering"]:
        """RePS's nulling intervention (Wu et al. 2025, arXiv 2505.20809), vector form: within the block the update
        is off and the residual stream after layer L loses its positive component along the steering vector,
        ``h − ReLU(h·d̂)·d̂`` with ``d̂ = Δb/‖Δb‖`` (differentiable in Δb). A zero vector nulls nothing.

        Example::

            >>> with steering.nulling():
            ...     out = model(input_ids)          # the concept direction removed where it is present
        """
        self._check_attached()
        if self.form != "vector":
            raise ValueError(f"the nulling intervention removes one direction: it is defined for the vector form, not "
                             f"{self.form!r} (RePS runs LoRA and local_weight at a negative factor instead)")
        d = self.module.delta_bias

        def hook(mod, args, output):
            h = output[0] if isinstance(output, tuple) else output
            u = (d / d.norm().clamp_min(1e-12)).to(h.dtype)
            h = h - torch.relu(h @ u)[..., None] * u
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = runner.decoder_layers(self.model)[self.layer].register_forward_hook(hook)
        try:
            with self.multiplier(0.0):
                yield self
        finally:
            handle.remove()

    def set_multiplier(self, m: Multiplier) -> None:
        """Set the strength used outside any ``multiplier`` block (1.0 after attach)."""
        self.module.multiplier = m

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors of the intervention."""
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters()
                if n in ("delta_bias", "delta_weight", "lora_a", "lora_b")]

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        mine = dict(self.named_parameters())
        if set(tensors) != set(mine):
            raise ValueError(f"steering tensors {sorted(tensors)} do not match this {self.form} intervention's "
                             f"{sorted(mine)}")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(mine[n].shape):
                raise ValueError(f"steering tensor {n} has shape {tuple(t.shape)}, expected {tuple(mine[n].shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"steering tensor {n} holds NaN or inf values")
        with torch.no_grad():
            for n, t in tensors.items():
                mine[n].copy_(t)

    def detach(self) -> None:
        """Remove the intervention: the model is restored exactly (modules, hooks, requires_grad flags)."""
        self._check_attached()
        if self.site == "down_proj":
            mlp = runner.decoder_layers(self.model)[self.layer].mlp
            mlp.down_proj = self._original
            self._original.weight.requires_grad_(self._flags[0])
            if self._original.bias is not None:
                self._original.bias.requires_grad_(self._flags[1])
        else:
            self._handle.remove()
        self._attached = False

    def _check_attached(self):
        if not self._attached:
            raise RuntimeError("this Steering was detached")

    def digest(self) -> str:
        """A SHA-256 of the intervention (form, layer, site and its tensors' values): equal digests, equal steering.
        Resumable sweeps check their blocks against it."""
        import hashlib

        h = hashlib.sha256(f"{self.form}|{self.layer}|{self.site}|{self.rank}".encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)  # its bytes, no copy
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        cfg = self.model.config
        return {"format": _FORMAT, "form": self.form, "layer": str(self.layer), "site": self.site,
                "rank": str(self.rank or 0), "model": runner.model_name(self.model),
                "model_type": cfg.model_type, "hidden_size": str(cfg.hidden_size),
                "intermediate_size": str(getattr(cfg, "intermediate_size", 0)),
                "num_hidden_layers": str(cfg.num_hidden_layers), "objective": self.objective or "untrained",
                "delta_bias": "1" if self.delta_bias else "0", **self.notes}

    def save(self, path: str) -> None:
        """Write the intervention to ``path`` as safetensors, with metadata checked by :func:`load_steering`."""
        from safetensors.torch import save_file

        save_file({n: t.contiguous().cpu() for n, t in self.state_dict().items()}, path, metadata=self.metadata())

    def export(self, out: str, *, m: float, format: str, full: bool = False) -> list[str]:
        """Write this intervention at strength ``m`` as ``format`` ("control-vector", "peft" or "merged") to ``out``;
        returns the written paths. See :mod:`fastsplit.hf.export` for what each format holds and refuses.

        Example::

            >>> steering.export("optimism.gguf", m=3.2, format="control-vector")   # llama.cpp --control-vector
        """
        from ..export import export_tensors

        self._check_attached()
        return export_tensors(self.metadata(), self.state_dict(), out, m=m, format=format, model=self.model,
                              config=self.model.config, full=full)

    def __repr__(self) -> str:
        rank = f", rank={self.rank}" if self.rank else ""
        return f"Steering(layer={self.layer}, site={self.site}, form={self.form}{rank}, module={self.module!r})"


def attach(model: nn.Module, layer: int, form: str, *, rank: int = 4, site: str = "down_proj",
           backend: str = "auto", delta_bias: bool = True) -> Steering:
    """Attach a steering intervention of ``form`` ("vector", "lora", "local_weight") at decoder layer ``layer``.

    ``site="down_proj"`` (the paper's placement) makes layer L's ``mlp.down_proj`` a SteeredLinear: on Llama,
    Qwen2 and SmolLM the vector form there adds exactly m·v to the residual stream after layer L.
    ``site="residual"`` adds the update to the decoder layer's output (differs on Gemma-2, whose MLP output
    passes a post-feedforward norm). Every form starts as a no-op; train it with :func:`fastsplit.train`.
    ``delta_bias=False`` (LoRA, local_weight) trains no Δb, so the peft export is a plain adapter that vLLM loads.
    """
    layer = resolve_layer(layer, len(runner.decoder_layers(model)))
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    if form == "lora" and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int for form='lora', got {rank!r}")
    if form == "vector" and not delta_bias:
        raise ValueError("delta_bias=False leaves the vector form nothing to train (its update is Δb alone)")
    return Steering(model, layer, form, rank=rank, site=site, backend=backend, delta_bias=delta_bias)


def resolve_layer(layer: int, n: int) -> int:
    """``layer`` as an index in [0, n): a negative layer counts from the last, as in Python (-1 is n - 1)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer must be an int in [-{n}, {n}) for this {n}-layer model (negative counts from "
                         f"the last layer), got {layer!r}")
    return layer % n


def read_steering_metadata(path: str) -> dict[str, str]:
    """The metadata of a saved steering file, checked for the fields fastsplit writes (``fastsplit.steerfile``)."""
    return steerfile.read_metadata(path)


def load_steering(model: nn.Module, path: str, *, backend: str = "auto", check_model_name: bool = True) -> Steering:
    """Attach the intervention saved at ``path`` to ``model``, after checking its metadata against the model.

    A different model (name, hidden sizes, layer count) is a clear error, never a silent wrong load.
    """
    from safetensors.torch import load_file

    meta = read_steering_metadata(path)
    check_steering_metadata(meta, model.config, path, check_model_name=check_model_name)
    steering = attach(model, int(meta["layer"]), meta["form"], rank=int(meta["rank"]) or 4, site=meta["site"],
                      backend=backend, delta_bias=steerfile.has_delta_bias(meta))
    try:
        p = steering.parameters()[0]
        steering.load_state_dict({k: v.to(p.device, p.dtype) for k, v in load_file(path).items()})
    except Exception:
        steering.detach()
        raise
    steering.objective = meta.get("objective")
    return steering


def check_steering_metadata(meta: dict, config, path: str, *, check_model_name: bool = True) -> None:
    """A steering file's metadata against a model's config (no weights needed): name, sizes, layer count
    (:func:`fastsplit.steerfile.check_model`)."""
    steerfile.check_model(meta, config, path, model_name=runner.config_name(config) if check_model_name else None)

"""Modules over the ops: ``SteeredLinear`` (drop-in for nn.Linear) and ``SplitLoss``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .ops._checks import Multiplier
from .ops.split_loss import split_loss
from .ops.steered_linear import steered_linear

FORMS = ("vector", "lora", "local_weight")

__all__ = ["SteeredLinear", "SplitLoss", "FORMS", "init_steering_parameters"]


def init_steering_parameters(module: nn.Module, in_features: int, out_features: int, form: str, rank: int,
                             delta_bias: bool = True, **factory) -> None:
    """Register the trainable update of ``form`` on ``module``: ``delta_bias`` [out] (zeros; None with
    ``delta_bias=False``, for LoRA and local_weight, which then export as plain adapters), plus ``lora_a`` [r, in]
    (peft's Kaiming init) and ``lora_b`` [out, r] (zeros), or ``delta_weight`` [out, in] (zeros); the others are None.
    Every form starts as a no-op."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "lora" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int for form='lora', got {rank!r}")
    if not isinstance(delta_bias, bool):
        raise TypeError(f"delta_bias must be a bool, got {type(delta_bias).__name__}")
    if form == "vector" and not delta_bias:
        raise ValueError("delta_bias=False leaves the vector form nothing to train (its update is Δb alone)")
    module.form, module.rank = form, (rank if form == "lora" else None)
    module.delta_bias = nn.Parameter(torch.zeros(out_features, **factory)) if delta_bias else None
    module.delta_weight = module.lora_a = module.lora_b = None
    if form == "lora":
        module.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        nn.init.kaiming_uniform_(module.lora_a, a=math.sqrt(5))  # peft's default init for A
        module.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))
    elif form == "local_weight":
        module.delta_weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))


class SteeredLinear(nn.Module):
    """A linear layer with a steering update: ``y = x·(W + m·ΔW)ᵀ + (b + m2·Δb)``.

    Forms (arXiv 2602.02343): ``"vector"`` trains only ``delta_bias`` [out] (a steering vector);
    ``"lora"`` trains ``lora_a`` [r, in] (random) and ``lora_b`` [out, r] (zeros) plus ``delta_bias``;
    ``"local_weight"`` trains ``delta_weight`` [out, in] (zeros) plus ``delta_bias``. Every form starts
    as the base layer. ``multiplier`` is the steering factor m: a float, or a [B] / [B, T] tensor for one
    factor per sequence / token. ``bias_multiplier`` (default None: same as ``multiplier``) is m2.

    Build one around an existing layer with :meth:`from_linear`; its W and b are shared, not copied.

    Example::

        >>> base = torch.nn.Linear(16, 8)
        >>> layer = SteeredLinear.from_linear(base, form="lora", rank=4)
        >>> layer.multiplier = torch.tensor([0.0, 2.0])   # two strengths in one batch
        >>> layer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, form: str = "vector",
                 rank: int = 4, multiplier: Multiplier = 1.0, backend: str = "auto", delta_bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, form=form, rank=rank, multiplier=multiplier, backend=backend, freeze_base=True,
                    delta_bias=delta_bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, form: str = "vector", rank: int = 4, *,
                    multiplier: Multiplier = 1.0, backend: str = "auto",
                    freeze_base: bool = True, delta_bias: bool = True) -> "SteeredLinear":
        """Wrap ``linear``: its ``weight``/``bias`` Parameters are shared (frozen unless
        ``freeze_base=False``, for local-weight fine-tuning of W itself)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, form=form, rank=rank, multiplier=multiplier, backend=backend,
                    freeze_base=freeze_base, delta_bias=delta_bias)
        return self

    def _setup(self, linear: nn.Linear, *, form, rank, multiplier, backend, freeze_base, delta_bias=True) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        self.multiplier: Multiplier = multiplier
        self.bias_multiplier: Optional[Multiplier] = None
        self.weight = linear.weight
        self.bias = linear.bias
        init_steering_parameters(self, self.in_features, self.out_features, form, rank, delta_bias,
                                 device=linear.weight.device, dtype=linear.weight.dtype)
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out]."""
        return steered_linear(x, self.weight, self.bias, delta_weight=self.delta_weight,
                              lora_a=self.lora_a, lora_b=self.lora_b, delta_bias=self.delta_bias,
                              m1=self.multiplier, m2=self.bias_multiplier, backend=self.backend)

    @staticmethod
    def _describe(m) -> str:
        return f"tensor{list(m.shape)}" if isinstance(m, Tensor) else f"{m:g}"

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, form={self.form}")
        if self.form == "lora":
            s += f", rank={self.rank}"
        s += f", multiplier={self._describe(self.multiplier)}"
        if self.bias_multiplier is not None:
            s += f", bias_multiplier={self._describe(self.bias_multiplier)}"
        return s


class SplitLoss(nn.Module):
    """The SPLIT loss as a module holding its hyper-parameters; see :func:`fastsplit.split_loss`.

    Example::

        >>> crit = SplitLoss(gamma=5.0, theta=0.4, reduction="pair")
        >>> loss = crit(h_pos, h_neg, model.lm_head.weight, labels_pos, labels_neg)
    """

    def __init__(self, *, lambda_p: float = 1.0, lambda_n: float = 0.5, gamma: float = 5.0, theta: float = 0.4,
                 reduction: str = "batch", ignore_index: int = -100, shift: bool = True,
                 logit_softcap: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__()
        from .ops.split_loss import REDUCTIONS

        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.lambda_p, self.lambda_n, self.gamma, self.theta = lambda_p, lambda_n, gamma, theta
        self.reduction, self.ignore_index, self.shift = reduction, ignore_index, shift
        self.logit_softcap, self.backend = logit_softcap, backend

    def forward(self, hidden_pos: Tensor, hidden_neg: Tensor, lm_head_weight: Tensor, labels_pos: Tensor,
                labels_neg: Tensor, *, lm_head_bias: Optional[Tensor] = None, return_parts: bool = False):
        """``hidden_*`` [B, T*, H], ``lm_head_weight`` [V, H], ``labels_*`` [B, T*] -> loss (and parts)."""
        return split_loss(hidden_pos, hidden_neg, lm_head_weight, labels_pos, labels_neg,
                          lambda_p=self.lambda_p, lambda_n=self.lambda_n, gamma=self.gamma, theta=self.theta,
                          reduction=self.reduction, ignore_index=self.ignore_index, shift=self.shift,
                          lm_head_bias=lm_head_bias, logit_softcap=self.logit_softcap,
                          return_parts=return_parts, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"lambda_p={self.lambda_p}, lambda_n={self.lambda_n}, gamma={self.gamma}, theta={self.theta}, "
                f"reduction={self.reduction}, logit_softcap={self.logit_softcap}")

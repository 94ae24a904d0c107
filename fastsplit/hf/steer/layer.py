"""The steered modules that stand in a model: ``SteeredLinear`` (from :mod:`fastsplit.nn`) at an MLP's
down_proj, and ``ResidualSteer`` on a decoder layer's output."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ...nn import SteeredLinear, init_steering_parameters
from ...ops._checks import Multiplier
from ...ops.steered_linear import steered_linear

__all__ = ["ResidualSteer", "SteeredLinear"]


class ResidualSteer(nn.Module):
    """The update at the residual site: ``h + m1·(h·ΔWᵀ) + m2·Δb`` on a decoder layer's output [B, T, H]
    (the unified form with W = I, b = 0), computed by the steered-linear op with no base weight, on its torch
    path: with no base GEMM there is nothing for a fused kernel to fold the update into.

    Example::

        >>> steer = ResidualSteer(576, "vector", rank=4)
        >>> steer.multiplier = torch.tensor([0.0, 2.0])
        >>> steer(torch.randn(2, 5, 576)).shape
        torch.Size([2, 5, 576])
    """

    def __init__(self, hidden: int, form: str, rank: int, *, delta_bias: bool = True, device=None, dtype=None):
        super().__init__()
        init_steering_parameters(self, hidden, hidden, form, rank, delta_bias, device=device, dtype=dtype)
        self.multiplier: Multiplier = 1.0
        self.bias_multiplier: Optional[Multiplier] = None

    def forward(self, h: Tensor) -> Tensor:
        return h + steered_linear(h, None, delta_weight=self.delta_weight, lora_a=self.lora_a, lora_b=self.lora_b,
                                  delta_bias=self.delta_bias, m1=self.multiplier, m2=self.bias_multiplier,
                                  backend="torch")

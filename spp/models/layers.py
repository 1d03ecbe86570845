"""Building blocks shared by the reference models: He-initialised convs and Scaled Weight Standardisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def he_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, gain: float = math.sqrt(2.0)) -> nn.Conv2d:
    """A bias-free conv with weights ~ N(0, gain^2 / fan_in): He init for relu with the default gain."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    fan_in = in_ch * kernel * kernel
    with torch.no_grad():
        conv.weight.normal_(0.0, gain / math.sqrt(fan_in))
    return conv


class ScaledStdConv2d(nn.Conv2d):
    """Conv with Scaled Weight Standardisation (Brock et al. 2021, DeepMind's WSConv2D).

    W_hat = gain * gamma * (W - mean) / (std * sqrt(fan_in)), mean and population std over each output
    channel's fan-in, computed in every forward so the weights stay standardised during training. ``gamma`` is the
    preceding activation's constant (1 for a conv that sees the raw input); ``gain`` is learnable, init 1; bias 0.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, gamma: float = 1.0, eps: float = 1e-4
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=True)
        self.gain = nn.Parameter(torch.ones(out_ch, 1, 1, 1))
        self.gamma = float(gamma)
        self.eps = eps  # floor on var * fan_in, as DeepMind's max(var * fan_in, 1e-4)
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * (self.gain * self.gamma)
        return (w - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:.4f}"

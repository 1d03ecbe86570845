"""Building blocks shared by the reference models: He-initialised convs and linears, Scaled Weight Standardisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


def he_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, gain: float = math.sqrt(2.0)) -> nn.Conv2d:
    """A bias-free conv with weights ~ N(0, gain^2 / fan_in): He init for relu with the default gain."""
    # skip_init: nn.Conv2d's own (kaiming-uniform) init would be drawn and thrown away, most of a deep model's
    # build time; the weights are drawn once, below.
    conv = skip_init(nn.Conv2d, in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
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

    def reset_parameters(self) -> None:
        """W ~ N(0, 1 / fan_in), bias 0 (nn.Conv2d calls this: its kaiming-uniform draw is never made)."""
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        out, fan_in = w.shape[0], w[0].numel()
        flat = w.reshape(out, fan_in)
        # Mean, then the population variance from squared deviations (two passes, exact): torch.var_mean is the
        # same math but 10-20x slower on CPU, and this runs for every conv in every forward.
        mean = flat.mean(dim=1, keepdim=True)
        var = F.mse_loss(flat, mean.expand_as(flat), reduction="none").mean(dim=1, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * (self.gain.view(out, 1) * self.gamma)
        return ((flat - mean) * scale).view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:.4f}"


def he_linear(in_features: int, out_features: int, gain: float = 1.0) -> nn.Linear:
    """A bias-free linear layer with weights ~ N(0, gain^2 / fan_in): variance-preserving for gain 1."""
    linear = skip_init(nn.Linear, in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0.0, gain / math.sqrt(in_features))
    return linear


class ScaledStdLinear(nn.Linear):
    """Linear layer with Scaled Weight Standardisation: each output row has zero mean and squared norm gamma^2.

    The token analogue of ``ScaledStdConv2d`` (fan-in = in_features): W_hat = gain * gamma * (W - mean) /
    (std * sqrt(fan_in)), recomputed in every forward. A zero-mean row removes an input offset shared by all
    features (an activation's mean); the unit norm keeps the variance of i.i.d. unit-variance inputs.
    """

    def __init__(self, in_features: int, out_features: int, gamma: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.gain = nn.Parameter(torch.ones(out_features, 1))
        self.gamma = float(gamma)
        self.eps = eps

    def reset_parameters(self) -> None:
        """W ~ N(0, 1 / fan_in), bias 0 (nn.Linear calls this: its kaiming-uniform draw is never made)."""
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=1, keepdim=True)
        var = F.mse_loss(w, mean.expand_as(w), reduction="none").mean(dim=1, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * self.in_features, min=self.eps)) * (self.gain * self.gamma)
        return (w - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:.4f}"

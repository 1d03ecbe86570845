"""Activations by name, and the constants that make them preserve signal on N(0,1) inputs.

``gamma(name)`` = 1 / std(g(z)) for z ~ N(0,1): Scaled WS multiplies its weights by it, because weight
standardisation removes the mean of g(z) and leaves only its variance. ``second_moment_gain(name)`` =
1 / sqrt(E[g(z)^2]) is the matching He-style gain for convs without WS (sqrt(2) for relu), where the mean passes.
Both are Gaussian integrals computed numerically once per name and cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from spp.errors import SppError, close_matches

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "log_sigmoid": F.logsigmoid,
}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise SppError(
            f"unknown activation {name!r}{close_matches(name, ACTIVATIONS)}; known: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


@cache
def gaussian_moments(name: str) -> tuple[float, float]:
    """(E[g(z)], E[g(z)^2]) for z ~ N(0,1), by the trapezoid rule on [-12, 12] in float64 (error < 1e-9)."""
    fn = get_activation(name)
    z = torch.linspace(-12.0, 12.0, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    g = fn(z)
    m1 = torch.trapezoid(g * density, z).item()
    m2 = torch.trapezoid(g * g * density, z).item()
    return m1, m2


def gamma(name: str) -> float:
    """1 / std(g(z)): makes g variance-preserving after a zero-mean (standardised) weight. relu: 1.712859."""
    m1, m2 = gaussian_moments(name)
    return 1.0 / math.sqrt(m2 - m1 * m1)


def second_moment_gain(name: str) -> float:
    """1 / sqrt(E[g(z)^2]): the He-init gain for g (sqrt(2) for relu), right when the weights keep the mean."""
    return 1.0 / math.sqrt(gaussian_moments(name)[1])


class Activation(nn.Module):
    """A named activation as a module, so it shows up (and can be hooked) in ``named_modules``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name

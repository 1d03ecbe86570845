"""Signal propagation as a unit test: copy this file into your tests/ and put your block where ``MyBlock`` is.

    pytest examples/check_in_ci.py

The test records the SPP of a small stack of your block at initialisation (``spp.record``) and asks ``spp.check``
for its verdicts: it fails, naming the blocks and the numbers, when the stack shows a mean shift, a variance that
explodes or collapses with depth, a branch that dominates its block, or NaN/Inf. A block that keeps the signal in
check (here a pre-activation BN-ReLU-Conv block: each adds about the same variance, so the variance grows linearly)
passes; ``BrokenBlock`` (no normalisation, He-init weights, ReLU's positive mean passed on) fails on mean shift and
variance growth. Tiny sizes keep it well under a second on a CPU.

The same verdicts run from the shell: ``spp check --model my_blocks.py:make_net`` (exit 0 healthy, 1 errors, 3 NaN).
"""

from __future__ import annotations

import torch
from torch import nn

import spp
from spp.verdicts import format_findings

DEPTH, WIDTH, RESOLUTION, BATCH = 8, 32, 16, 8


class MyBlock(nn.Module):
    """Your new block goes here. This one: x + conv(relu(bn(x))), a pre-activation residual block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.relu(self.norm(x)))


class BrokenBlock(nn.Module):
    """What the test catches: x + conv(relu(x)) with He init and nothing to normalise the branch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.relu(x))


class Stack(nn.Module):
    """A stem and ``depth`` blocks: enough depth for a trend, small enough for a unit test."""

    def __init__(self, block: type[nn.Module], depth: int = DEPTH, width: int = WIDTH) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.stem.weight, nonlinearity="linear")  # unit variance in, unit variance out
        self.blocks = nn.Sequential(*(block(width) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def signal_errors(model: nn.Module, seed: int = 0) -> list:
    """The error-level verdicts of ``spp.check`` on ``model``'s SPP at init (Gaussian input, train mode)."""
    x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))
    record = spp.record(model, x, mode="train")
    return [f for f in spp.check(record) if f.level == "error"]


def test_my_block_keeps_signal_propagation() -> None:
    torch.manual_seed(0)
    errors = signal_errors(Stack(MyBlock))
    assert not errors, "the new block breaks signal propagation:\n" + format_findings(errors)

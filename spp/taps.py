"""Where a residual block is measured: its output, and its residual branch before scaling.

A ``Tap`` is one point on the SPP's x-axis. Discovery (``spp.discovery``) turns a model into a list of taps; the
recorder (``spp.hooks``) hooks the sites they name. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SiteKind = Literal["output", "input"]


@dataclass(frozen=True)
class Site:
    """A tensor in the forward pass: the output of a module, or the first positional input of a module."""

    module: str  # qualified name in model.named_modules(); "" is the model itself
    kind: SiteKind = "output"

    def __str__(self) -> str:
        return f"{self.module or '<model>'}:{self.kind}"


@dataclass(frozen=True)
class Difference:
    """A tensor that no module returns: ``minuend - subtrahend`` (a branch computed as output minus shortcut)."""

    minuend: Site
    subtrahend: Site

    def __str__(self) -> str:
        return f"{self.minuend} - {self.subtrahend}"


@dataclass(frozen=True)
class Tap:
    """One SPP point: a residual addition (or the stem), read at ``output``; its branch read at ``residual``.

    ``residual`` is the branch before any skip gain, alpha or layer scale; ``None`` for the stem.
    ``channel_dim`` is the channel axis of both tensors, ``None`` to infer it from the rank
    (2-D and 4-D/5-D: axis 1; 3-D token layouts (B, N, C): the last axis).
    """

    name: str
    module: str  # qualified name of the block (for the stem: the first block, whose input it reads)
    stage: int  # 0 = stem, then 1..S
    output: Site
    residual: Site | Difference | None
    rule: str  # which discovery rule found it, shown by `spp blocks`
    channel_dim: int | None = None
    note: str = ""  # e.g. "branch is zero at init (zero-init gain)"
    expected_var: float | None = None  # theory for the output variance, where the model knows it (NF-ResNets)
    residual_channel_dim: int | None = None  # the branch's own channel axis where it differs (ConvNeXt's NHWC mlp)

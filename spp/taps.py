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
    """A tensor in the forward pass: the output of a module, or one input argument of a module.

    ``arg`` picks the input: a position (0 = the first positional argument; found by its parameter name when the
    caller passes it as a keyword) or a keyword name. BERT's ``BertSelfOutput.forward(hidden, input_tensor)`` adds
    into its second argument: ``Site("...output", "input", 1)`` is that shortcut.
    """

    module: str  # qualified name in model.named_modules(); "" is the model itself
    kind: SiteKind = "output"
    arg: int | str = 0

    def __str__(self) -> str:
        where = f"{self.module or '<model>'}:{self.kind}"
        return where if self.arg == 0 else f"{where}[{self.arg}]"


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
    ``shortcut`` is where the value the branch is added to can be read (the block input, the previous addition,
    a projection's output), so that ``output == shortcut + scale * branch`` can be checked on real tensors.
    ``branch`` names the branch of a block that adds several ("attn", "mlp"); "" for a block's only branch.
    ``stream`` says what ``output`` holds when it is not the plain sum after the addition (post-norm blocks:
    the input of the norm that follows the addition); ``post_activation`` names an activation applied to the sum
    before ``output`` (post-activation ResNets: "relu"), so the residual identity reads
    ``output == act(shortcut + scale * branch)``.
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
    shortcut: Site | None = None
    branch: str = ""
    stream: str = ""
    post_activation: str = ""  # an activation applied after the addition (post-activation ResNets: "relu")
    # How the tensor read at ``residual`` becomes the added branch when only layout ops lie between them:
    # (("transpose", (1, 2)),) means added = residual.transpose(1, 2); the branch's channel axis follows.
    residual_transforms: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # A Difference branch is (output - shortcut) / the parameter named here (a per-channel scale undone exactly).
    residual_scale: str = ""
    refusal: str = ""  # a rule that found a block it cannot read correctly says why; the recorder refuses the tap
    layer: int = -1  # the block's number (0 = stem); the taps of one block share it; set by find_taps

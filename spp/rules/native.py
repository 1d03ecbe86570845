"""The rule for spp's own models (and any user model written the same way): blocks that say where to read them.

A block class names its branch child in ``spp_residual`` (one branch; the block's output is the stream), or
implements ``spp_taps(self, name) -> list[Tap]`` for anything richer (transformer layers with two branches, post-norm
streams). ``spp_expected_var`` on a block is the variance its theory predicts at the block's output.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from spp.rules.common import make_tap, rel
from spp.taps import Site, Tap


def spp_native(name: str, module: nn.Module) -> list[Tap] | None:
    """Blocks that declare their taps (``spp_taps``) or their branch child (``spp_residual``)."""
    declare = getattr(module, "spp_taps", None)
    if callable(declare):
        return list(declare(name))
    branch = getattr(type(module), "spp_residual", None)
    if branch is None:
        return None
    projection = getattr(module, "shortcut", None)
    shortcut = Site(rel(name, "shortcut")) if isinstance(projection, nn.Module) else Site(name, "input")
    tap = make_tap(name, Site(rel(name, branch)), "spp", shortcut=shortcut)
    expected = getattr(module, "spp_expected_var", None)
    return [tap if expected is None else replace(tap, expected_var=float(expected))]


NATIVE_RULES = (("spp", spp_native),)

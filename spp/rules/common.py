"""What every discovery rule shares: recognising classes without importing their library, reading gains, and
building taps with the conventions of ``spp.taps``."""

from __future__ import annotations

import torch
from torch import nn

from spp.taps import Difference, Site, Tap

ZERO_BRANCH = "residual branch is zero at init ({why}): a flat SPP is the truth, not a bug"


def is_class(module: nn.Module, *qualnames: str) -> bool:
    """Whether ``module``'s class or a base class is one of ``qualnames`` ("package.module.Class"): recognises a
    library's classes without importing the library."""
    return any(f"{c.__module__}.{c.__qualname__}" in qualnames for c in type(module).__mro__)


def child(module: nn.Module, rel: str) -> nn.Module | None:
    try:
        return module.get_submodule(rel)
    except AttributeError:
        return None


def all_zero(value: object) -> bool:
    """Whether a gain is exactly zero (zero-init); a random weight's first entry settles it without a scan."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.is_meta:
        return False
    flat = value.detach().reshape(-1)
    return not bool(flat[0]) and not bool(flat.any())


def rel(name: str, child_name: str) -> str:
    """The qualified name of ``child_name`` inside the module called ``name`` ("" is the model itself)."""
    return f"{name}.{child_name}" if name else child_name


def make_tap(
    name: str,
    residual: Site | Difference,
    rule: str,
    *,
    output: Site | None = None,
    suffix: str = "",
    channel_dim: int | None = None,
    note: str = "",
    shortcut: Site | None = None,
    branch: str = "",
    stream: str = "",
    post_activation: str = "",
    residual_transforms: tuple[tuple[str, tuple[int, ...]], ...] = (),
    residual_scale: str = "",
    refusal: str = "",
) -> Tap:
    """A tap of block ``name``: read at the block's output unless ``output`` says otherwise; stage set later."""
    return Tap(
        name=name + suffix,
        module=name,
        stage=-1,
        output=output or Site(name),
        residual=residual,
        rule=rule,
        channel_dim=channel_dim,
        note=note,
        shortcut=shortcut,
        branch=branch,
        stream=stream,
        post_activation=post_activation,
        residual_transforms=residual_transforms,
        residual_scale=residual_scale,
        refusal=refusal,
    )

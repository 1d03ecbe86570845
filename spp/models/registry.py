"""Names -> reference models. Listing names imports nothing heavy, so ``spp models`` starts in a blink."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from spp.errors import SppError, close_matches

# Normalisation layers of the BN reference families (``norm=``); spp.models.resnet builds them.
NORMS: tuple[str, ...] = ("bn", "gn", "ln", "in", "none")

# Bottleneck blocks per stage of each depth (Brock et al. 2021); spp.models.resnet builds from this table.
DEPTHS: dict[int, tuple[int, ...]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}


@dataclass(frozen=True)
class Family:
    prefix: str
    factory: str  # "module:function", imported on first use
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    options: str = ""  # the family's own keyword options, for `spp models`


_NORM_OPTIONS = f"norm={'|'.join(NORMS)} (default bn), groups=32 (gn)"

FAMILIES: tuple[Family, ...] = (
    Family("bn_relu_resnet", "spp.models.resnet:preact_resnet", "BN-ReLU-Conv (pre-activation ResNet-V2)",
           {"order": "bn_relu"}, _NORM_OPTIONS),
    Family("relu_bn_resnet", "spp.models.resnet:preact_resnet", "ReLU-BN-Conv", {"order": "relu_bn"},
           _NORM_OPTIONS),
    Family("nf_resnet", "spp.models.nf_resnet:nf_resnet", "NF-ResNet with Scaled WS (alpha 0.2)",
           options="alpha=0.2, ws=true"),
)
REFERENCE_FAMILIES = tuple(f.prefix for f in FAMILIES)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: Family
    depth: int

    @property
    def layers(self) -> tuple[int, ...]:
        return DEPTHS[self.depth]

    @property
    def description(self) -> str:
        options = f"; options {self.family.options}" if self.family.options else ""
        return f"{self.family.description}, {self.depth} layers, blocks per stage {list(self.layers)}{options}"


REGISTRY: dict[str, ModelEntry] = {
    f"{fam.prefix}{depth}": ModelEntry(f"{fam.prefix}{depth}", fam, depth) for fam in FAMILIES for depth in DEPTHS
}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, optionally filtered by an fnmatch pattern (``"nf_*"``)."""
    import fnmatch

    names = list(REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    return name in REGISTRY


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SppError(f"unknown model {name!r}{close_matches(name, REGISTRY)}; see `spp models`") from None


def create_model(name: str, **kwargs: Any):
    """Build a registered reference model, randomly initialised.

    kwargs: ``width`` (channel multiplier), ``in_chans``, ``activation``, ``num_classes``; for ``nf_resnet*`` also
    ``alpha`` and ``ws``; for ``bn_relu_resnet*`` / ``relu_bn_resnet*`` also ``norm`` (one of ``NORMS``) and
    ``groups`` (GroupNorm's group count, default 32).
    """
    entry = get_entry(name)
    module_name, fn_name = entry.family.factory.split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
    try:
        return factory(entry.layers, **{**entry.family.defaults, **kwargs})
    except TypeError as exc:
        raise SppError(f"bad option for {name}: {exc}") from None


def nearest_depth(num_blocks: int) -> int:
    """The depth-table entry whose block count is closest to ``num_blocks`` (the deeper one on a tie)."""
    return min(DEPTHS, key=lambda d: (abs(sum(DEPTHS[d]) - num_blocks), -d))

"""Names -> reference models. Listing names imports nothing heavy, so ``spp models`` starts in a blink.

Two kinds: ResNets for image models (depth = layers of the ResNet, ``DEPTHS`` gives blocks per stage) and
transformers for token models (depth = number of layers, each an attention and an MLP branch).
"""

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
# Layers of the reference transformers (one stage each), so a reference can match a user model's depth.
TRANSFORMER_DEPTHS: tuple[int, ...] = (6, 12, 24, 48, 96)
KINDS = ("resnet", "transformer")


@dataclass(frozen=True)
class Family:
    prefix: str
    factory: str  # "module:function", imported on first use
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    options: str = ""  # the family's own keyword options, for `spp models`
    kind: str = "resnet"  # "resnet" (image models) or "transformer" (token models)


_NORM_OPTIONS = f"norm={'|'.join(NORMS)} (default bn), groups=32 (gn)"
_TRANSFORMER_OPTIONS = "width=256, heads=4, mlp_ratio=4, activation=gelu, causal=true, vocab_size=256, seq_len=128"

FAMILIES: tuple[Family, ...] = (
    Family("bn_relu_resnet", "spp.models.resnet:preact_resnet", "BN-ReLU-Conv (pre-activation ResNet-V2)",
           {"order": "bn_relu"}, _NORM_OPTIONS),
    Family("relu_bn_resnet", "spp.models.resnet:preact_resnet", "ReLU-BN-Conv", {"order": "relu_bn"},
           _NORM_OPTIONS),
    Family("nf_resnet", "spp.models.nf_resnet:nf_resnet", "NF-ResNet with Scaled WS (alpha 0.2)",
           options="alpha=0.2, ws=true"),
    Family("preln_transformer", "spp.models.transformer:preln_transformer", "Pre-LN transformer (x + f(LN(x)))",
           options=_TRANSFORMER_OPTIONS, kind="transformer"),
    Family("postln_transformer", "spp.models.transformer:postln_transformer", "Post-LN transformer (LN(x + f(x)))",
           options=_TRANSFORMER_OPTIONS, kind="transformer"),
    Family("nf_transformer", "spp.models.transformer:nf_transformer",
           "NF transformer (x + alpha f(x / beta), Scaled WS, shaped attention, alpha 0.2)",
           options=_TRANSFORMER_OPTIONS + ", alpha=0.2", kind="transformer"),
)


def reference_families(kind: str = "resnet") -> tuple[str, ...]:
    """The family prefixes of one kind, in the order spp draws them."""
    if kind not in KINDS:
        raise SppError(f"unknown reference kind {kind!r}; known: {', '.join(KINDS)}")
    return tuple(f.prefix for f in FAMILIES if f.kind == kind)


# The image references (the default of `spp run`); transformers: reference_families("transformer").
REFERENCE_FAMILIES = reference_families("resnet")


def depths(kind: str = "resnet") -> tuple[int, ...]:
    """The depth table of one kind: ResNet depths, or numbers of transformer layers."""
    reference_families(kind)  # the unknown-kind error
    return tuple(DEPTHS) if kind == "resnet" else TRANSFORMER_DEPTHS


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: Family
    depth: int

    @property
    def layers(self) -> tuple[int, ...]:
        """Blocks per stage: the ResNet table, or one stage of ``depth`` transformer layers."""
        return DEPTHS[self.depth] if self.family.kind == "resnet" else (self.depth,)

    @property
    def description(self) -> str:
        options = f"; options {self.family.options}" if self.family.options else ""
        if self.family.kind == "transformer":
            return f"{self.family.description}, {self.depth} layers{options}"
        return f"{self.family.description}, {self.depth} layers, blocks per stage {list(self.layers)}{options}"


REGISTRY: dict[str, ModelEntry] = {
    f"{fam.prefix}{depth}": ModelEntry(f"{fam.prefix}{depth}", fam, depth) for fam in FAMILIES
    for depth in depths(fam.kind)
}


def list_models(pattern: str | None = None, kind: str | None = None) -> list[str]:
    """Registered names, optionally filtered by an fnmatch pattern (``"nf_*"``) and a kind."""
    import fnmatch

    names = [n for n, e in REGISTRY.items() if kind is None or e.family.kind == kind]
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

    kwargs: ResNets: ``width`` (channel multiplier), ``in_chans``, ``activation``, ``num_classes``; for
    ``nf_resnet*`` also ``alpha`` and ``ws``; for ``bn_relu_resnet*`` / ``relu_bn_resnet*`` also ``norm`` (one of
    ``NORMS``) and ``groups`` (GroupNorm's group count, default 32). Transformers: ``width`` (d_model), ``heads``,
    ``mlp_ratio``, ``activation``, ``causal``, ``vocab_size``, ``seq_len``; for ``nf_transformer*`` also ``alpha``.
    """
    entry = get_entry(name)
    module_name, fn_name = entry.family.factory.split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
    try:
        return factory(entry.layers, **{**entry.family.defaults, **kwargs})
    except TypeError as exc:
        raise SppError(f"bad option for {name}: {exc}") from None


def nearest_depth(num_blocks: int, kind: str = "resnet") -> int:
    """The depth-table entry closest to ``num_blocks`` (the deeper one on a tie).

    ``kind="resnet"``: ``num_blocks`` counts residual blocks, compared with each depth's blocks per stage summed.
    ``kind="transformer"``: ``num_blocks`` counts layers (an attention and an MLP branch each, i.e. half the
    taps of a two-tap-per-layer model), compared with the layer table.
    """
    if kind == "transformer":
        return min(TRANSFORMER_DEPTHS, key=lambda d: (abs(d - num_blocks), -d))
    reference_families(kind)
    return min(DEPTHS, key=lambda d: (abs(sum(DEPTHS[d]) - num_blocks), -d))

"""Find a model's residual blocks and where to read each one's output and residual branch.

Rules are tried on every module in ``named_modules`` order; the first rule that claims a module turns it into
one or more taps and its children are not searched further. ``--blocks`` patterns replace the rules' choice of
modules; ``--residual-tap`` replaces their choice of branch. Stage = the container holding the block.
Third-party families and the traced fallback live in ``spp.families``, imported at the bottom of this module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from spp.errors import SppError
from spp.taps import Difference, Site, Tap

Rule = Callable[[str, nn.Module], "Sequence[Tap] | None"]


def spp_native(name: str, module: nn.Module) -> list[Tap] | None:
    """spp's own reference blocks name their branch in ``spp_residual``."""
    rel = getattr(type(module), "spp_residual", None)
    if rel is None:
        return None
    return [
        Tap(
            name=name,
            module=name,
            stage=-1,
            output=Site(name),
            residual=Site(f"{name}.{rel}"),
            rule="spp",
            expected_var=getattr(module, "spp_expected_var", None),
        )
    ]


RULES: list[tuple[str, Rule]] = [("spp", spp_native)]
# Tried after every rule in RULES, so a rule registered later still wins over the generic guesses.
FALLBACK_RULES: list[tuple[str, Rule]] = []


def register_rule(label: str, rule: Rule, *, first: bool = False, fallback: bool = False) -> None:
    """Add a discovery rule: ``first=True`` tries it before the built-in ones, ``fallback=True`` after all."""
    if fallback:
        FALLBACK_RULES.append((label, rule))
    elif first:
        RULES.insert(0, (label, rule))
    else:
        RULES.append((label, rule))


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _by_patterns(model: nn.Module, patterns: Sequence[str]) -> list[Tap]:
    """Blocks chosen by fnmatch patterns on qualified names; the outermost match wins over its children."""
    chosen: list[str] = []
    for name, _ in model.named_modules():
        matched = name and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if matched and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    if not chosen:
        raise SppError(f"--blocks {' '.join(patterns)} matched no module; see the names with `spp blocks`")
    modules = dict(model.named_modules())
    taps = []
    for name in chosen:
        auto = _apply_rules(name, modules[name])
        if auto and len(auto) == 1:
            taps.append(replace(auto[0], rule=f"--blocks + {auto[0].rule}"))
        elif auto:
            taps.extend(replace(t, rule=f"--blocks + {t.rule}") for t in auto)
        else:
            taps.append(Tap(name=name, module=name, stage=-1, output=Site(name),
                            residual=Difference(Site(name), Site(name, "input")),
                            rule="--blocks (output - input)"))
    return taps


def _apply_rules(name: str, module: nn.Module) -> list[Tap] | None:
    for _label, rule in (*RULES, *FALLBACK_RULES):
        found = rule(name, module)
        if found:
            return list(found)
    return None


def _by_rules(model: nn.Module) -> list[Tap]:
    taps: list[Tap] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        found = _apply_rules(name, module)
        if found:
            taps.extend(found)
            claimed.append(name)
    return taps


def _with_residual_tap(model: nn.Module, taps: list[Tap], rel: str) -> list[Tap]:
    modules = dict(model.named_modules())
    out = []
    for t in taps:
        target = f"{t.module}.{rel}" if t.module else rel
        if target not in modules:
            raise SppError(f"--residual-tap {rel!r}: block {t.module!r} has no child {rel!r}")
        out.append(replace(t, residual=Site(target), rule=f"{t.rule}, --residual-tap {rel}"))
    return out


def find_taps(
    model: nn.Module,
    *,
    blocks: Sequence[str] | None = None,
    residual_tap: str | None = None,
    channel_dim: int | None = None,
) -> list[Tap]:
    """The SPP's points: the stem (the first block's input), then every residual block in forward order."""
    if isinstance(blocks, str):
        blocks = [blocks]
    if isinstance(model, torch.jit.ScriptModule):
        raise SppError(
            "TorchScript models run their forward in C++, where forward hooks never fire; "
            "save the model with torch.export (a .pt2 file) or pass its Python code as FILE.py:FACTORY"
        )
    taps = _by_patterns(model, blocks) if blocks else _by_rules(model)
    if not taps:
        raise SppError(
            f"no residual blocks found in {type(model).__name__}; name them with --blocks PATTERN "
            "(fnmatch on module names, e.g. --blocks 'layer*.?') and, if needed, --residual-tap CHILD"
        )
    if residual_tap:
        taps = _with_residual_tap(model, taps, residual_tap)
    stage_of: dict[str, int] = {}
    staged = []
    for t in taps:
        container = _parent(t.module)
        stage = stage_of.setdefault(container, len(stage_of) + 1)
        dim = channel_dim if channel_dim is not None else t.channel_dim
        staged.append(replace(t, stage=stage, channel_dim=dim))
    first = staged[0]
    stem = Tap(
        name="stem",
        module=first.module,
        stage=0,
        output=Site(first.module, "input"),
        residual=None,
        rule="input of the first block",
        channel_dim=staged[0].channel_dim,
        expected_var=getattr(model, "spp_stem_expected_var", None),
    )
    return [stem, *staged]


def stage_ends(taps: Sequence[Tap]) -> list[int]:
    """Index (into ``taps``) of the last tap of every stage, stem excluded."""
    ends = []
    for i, t in enumerate(taps):
        if i > 0 and (i + 1 == len(taps) or taps[i + 1].stage != t.stage):
            ends.append(i)
    return ends


# Third-party families (timm, torchvision) and the traced fallback register themselves on import.
from spp import families  # noqa: E402, F401

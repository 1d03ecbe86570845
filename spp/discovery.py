"""Find a model's residual blocks and where to read each one's output and residual branch.

``find_taps(model, rules=DEFAULT_RULES)`` tries the rules, in order, on every module in ``named_modules`` order;
the first rule that claims a module turns it into one or more taps and its children are not searched further.
Rules are plain data: a ``Rule`` is a name and a function ``(qualified_name, module) -> list[Tap] | None``, and
``DEFAULT_RULES`` is an ordered tuple a user extends by passing their own list::

    def my_block(name, module):
        if isinstance(module, MyBlock):
            return [Tap(name, name, -1, Site(name), Site(f"{name}.branch"), rule="my block")]
        return None

    taps = find_taps(model, rules=[Rule("my block", my_block), *DEFAULT_RULES])

``--blocks`` patterns replace the rules' choice of modules; ``--residual-tap`` replaces their choice of branch.
Stage = the container holding the block; layer = the block's number (a block's taps share it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from spp.errors import SppError
from spp.rules.native import NATIVE_RULES
from spp.rules.traced import traced_residual
from spp.rules.transformers import TRANSFORMER_RULES
from spp.rules.vision import VISION_RULES
from spp.taps import Difference, Site, Tap

RuleFunction = Callable[[str, nn.Module], "Sequence[Tap] | None"]


@dataclass(frozen=True)
class Rule:
    """A discovery rule: ``match(qualified_name, module)`` returns the module's taps, or None when it does not apply.

    A rule that recognises a block it cannot measure correctly raises ``SppError`` saying so: a refusal, never a
    wrong tap.
    """

    name: str
    match: RuleFunction

    def __call__(self, name: str, module: nn.Module) -> Sequence[Tap] | None:
        return self.match(name, module)


# Known families first, the traced fallback last: a family rule knows where a block's branch is read before its
# scale; the fallback proves an addition in the graph for anything else.
DEFAULT_RULES: tuple[Rule, ...] = (
    *(Rule(label, fn) for label, fn in NATIVE_RULES),
    *(Rule(label, fn) for label, fn in VISION_RULES),
    *(Rule(label, fn) for label, fn in TRANSFORMER_RULES),
    Rule("fallback (traced add)", traced_residual),
)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _apply(rules: Sequence[Rule], name: str, module: nn.Module) -> list[Tap] | None:
    for rule in rules:
        found = rule(name, module)
        if found:
            return list(found)
    return None


def _by_patterns(model: nn.Module, patterns: Sequence[str], rules: Sequence[Rule]) -> list[Tap]:
    """Blocks chosen by fnmatch patterns on qualified names; the outermost match wins over its children."""
    chosen: list[str] = []
    modules = dict(model.named_modules())
    for name in modules:
        matched = name and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if matched and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    if not chosen:
        raise SppError(f"--blocks {' '.join(patterns)} matched no module; see the names with `spp blocks`")
    taps: list[Tap] = []
    for name in chosen:
        try:
            auto = _apply(rules, name, modules[name])
        except SppError:  # a rule that refuses this block: --blocks reads it whole, as output - input
            auto = None
        if auto:
            taps.extend(replace(t, rule=f"--blocks + {t.rule}") for t in auto)
        else:
            taps.append(Tap(name=name, module=name, stage=-1, output=Site(name),
                            residual=Difference(Site(name), Site(name, "input")), shortcut=Site(name, "input"),
                            rule="--blocks (output - input)"))
    return taps


def _by_rules(model: nn.Module, rules: Sequence[Rule]) -> list[Tap]:
    """Every module a rule claims, outermost first; inside a claimed block its descendants are searched too
    (nested residual additions, e.g. a token mixer that adds its own residual), and their taps come before the
    block's own (a block's sub-modules run before its final addition)."""
    taps: list[Tap] = []
    claimed: list[tuple[str, int]] = []  # (block, index of its first tap in ``taps``)
    for name, module in model.named_modules():
        found = _apply(rules, name, module)
        if not found:
            continue
        outer = next(((c, at) for c, at in reversed(claimed) if name.startswith(c + ".")), None)
        if outer is None:
            claimed.append((name, len(taps)))
            taps.extend(found)
            continue
        if any(name.startswith(f"{t.module}.") and _site_module(t) == name for t in taps):
            continue  # the outer rule reads this module as a branch: its own adds are inside that branch
        seen = {(t.output, str(t.residual)) for t in taps} | {t.output for t in taps}
        nested = [replace(t, note=_joined(t.note, f"nested in {outer[0]}")) for t in found
                  if t.output not in seen and (t.output, str(t.residual)) not in seen]  # not an add already read
        if not nested:
            continue
        at = outer[1]
        taps[at:at] = nested
        claimed.append((name, at))
        claimed[:] = [(c, i + len(nested) if i >= at and c != name else i) for c, i in claimed]
    return taps


def _nothing_found(model: nn.Module) -> SppError:
    """Why no block was found: the model adds nothing to anything (DenseNet concatenates, VGG is plain), or it
    adds where no rule can read it (then --blocks is the way)."""
    from spp.rules.traced import adds_in

    adding = [name for name, module in model.named_modules() if adds_in(module)]
    kind = type(model).__name__
    if not adding:
        return SppError(f"no residual addition in {kind}: no module's forward adds a computed branch to its input, "
                        "so there is no residual stream to plot (DenseNet concatenates, VGG is plain)")
    shown = ", ".join(adding[:3]) + (", ..." if len(adding) > 3 else "")
    return SppError(f"no residual block found in {kind}, though {len(adding)} module(s) add tensors ({shown}) in a "
                    "way no rule proves residual; name the blocks with --blocks PATTERN (fnmatch on module names) "
                    "and, if needed, --residual-tap CHILD")


def _site_module(tap: Tap) -> str:
    return tap.residual.module if isinstance(tap.residual, Site) else ""


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _with_residual_tap(model: nn.Module, taps: list[Tap], child: str) -> list[Tap]:
    modules = dict(model.named_modules())
    out = []
    for t in taps:
        target = f"{t.module}.{child}" if t.module else child
        if target not in modules:
            raise SppError(f"--residual-tap {child!r}: block {t.module!r} has no child {child!r}")
        out.append(replace(t, residual=Site(target), rule=f"{t.rule}, --residual-tap {child}"))
    return out


def find_taps(
    model: nn.Module,
    *,
    rules: Sequence[Rule] = DEFAULT_RULES,
    blocks: Sequence[str] | None = None,
    residual_tap: str | None = None,
) -> list[Tap]:
    """The SPP's points: the stem (the first block's input), then every residual block in forward order.

    ``rules``: the discovery rules to try, in order (default ``DEFAULT_RULES``). ``blocks``: fnmatch patterns
    naming the block modules instead; ``residual_tap``: the child of each block whose output is the branch.
    Where each tensor's channels are is proven at record time (``spp.axes``), not here.
    """
    if isinstance(blocks, str):
        blocks = [blocks]
    if isinstance(model, torch.jit.ScriptModule):
        raise SppError(
            "TorchScript models run their forward in C++, where forward hooks never fire; "
            "save the model with torch.export (a .pt2 file) or pass its Python code as FILE.py:FACTORY"
        )
    taps = _by_patterns(model, blocks, rules) if blocks else _by_rules(model, rules)
    if not taps:
        raise _nothing_found(model)
    if residual_tap:
        taps = _with_residual_tap(model, taps, residual_tap)
    stage_of: dict[str, int] = {}
    layer_of: dict[str, int] = {}
    staged = []
    claimed = {t.module for t in taps}
    for t in taps:
        outermost = min((b for b in claimed if t.module.startswith(f"{b}.")), key=len, default=t.module)
        stage = stage_of.setdefault(_parent(outermost), len(stage_of) + 1)  # a nested block: its host's stage
        layer = layer_of.setdefault(t.module, len(layer_of) + 1)
        staged.append(replace(t, stage=stage, layer=layer))
    first = staged[0]
    stem = Tap(
        name="stem",
        module=first.module,
        stage=0,
        output=Site(first.module, "input"),
        residual=None,
        rule="input of the first block",
        expected_var=getattr(model, "spp_stem_expected_var", None),
        layer=0,
    )
    return [stem, *staged]


def stage_ends(taps: Sequence[Tap]) -> list[int]:
    """Index (into ``taps``) of the last tap of every stage, stem excluded."""
    ends = []
    for i, t in enumerate(taps):
        if i > 0 and (i + 1 == len(taps) or taps[i + 1].stage != t.stage):
            ends.append(i)
    return ends

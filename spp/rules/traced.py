"""The fallback rule: prove a residual addition in a one-level torch.fx trace of a module no family rule knows.

``traced_residual`` traces one module's own ``forward`` with torch.fx, every child kept opaque (cheap: one level
per module, and children never need to be traceable), and claims the module only if the value it returns is
``shortcut + branch`` (possibly followed by single-input ops such as an activation): the shortcut is the block's
input, an earlier such sum (pre-norm transformers add twice: one tap per addition), or a child's output computed
from the input (a projection), and the branch depends on the input too. Which operand is the skip is decided by
the graph: the input itself wins; otherwise the branch is the longer path (on a tie only a shortcut-like name such
as ``downsample``/``shortcut``/``proj`` decides, so parallel heads are not claimed); values that pass through
DropPath/Dropout or an Identity named ``drop_path``/``ls1`` are branches. A projection against a branch no module
returns is not claimed (which side is the skip would be a guess). The branch is read at the child module that
returns it, walking back through drop paths, layer-scale modules and products with input-free factors (so before
the scaling); failing that, as output - shortcut (after the scaling, and only when no activation follows the add).
Proving the add in the graph is what makes the guess safe: a module is never claimed because its name or its
children look residual. Modules that cannot be traced (shape-dependent control flow, say) are not claimed;
``--blocks`` and ``--residual-tap`` name them instead. The rule says nothing of channel axes: the recorder proves
them from the layers around each tensor. A ReLU after the last addition is named (``post_activation``) so the
recorder can check ``output == relu(shortcut + branch)``; any other op there leaves the tap unchecked.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections import Counter

import torch
from torch import fx, nn

from spp.modelstate import untouched
from spp.rules.common import make_tap, rel
from spp.taps import Difference, Site, Tap


class _OneLevelTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule call is one opaque ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


_ADD = {"add", "add_", "iadd"}
_INPLACE_ADD = {"add_", "iadd"}
_MUL = {"mul", "mul_", "imul"}
_SHAPE = {"reshape", "view", "flatten", "permute", "contiguous", "transpose", "squeeze", "unsqueeze"}
# Regularisers that only ever wrap a branch: a value passing through one is never the shortcut.
_DROP = re.compile(r"^(Dropout\d?d?|AlphaDropout|DropPath|DropBlock\d?d?|StochasticDepth)$")
_SCALE = re.compile(r"^(LayerScale\d?d?|Scale)$")
_BRANCH_NAME = re.compile(r"drop|(^|\.)ls\d*$|layer_?scale|gamma")
_SHORTCUT_NAME = re.compile(r"downsample|shortcut|skip|proj|identity|res")


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_function":
        packet = getattr(target, "overloadpacket", None)  # aten ops in torch.export graphs
        return getattr(packet if packet is not None else target, "__name__", "")
    return ""


def _node_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _graph_of(module: nn.Module) -> fx.Graph | None:
    """The module's own forward as an fx graph; None where it cannot be traced (or is torch.nn's code)."""
    graph = getattr(module, "graph", None)
    if isinstance(graph, fx.Graph):  # fx.GraphModule, torch.export's InterpreterModule
        return graph
    if type(module).forward.__module__.startswith("torch.nn.") or isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    concrete = {
        p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty and p.kind != p.VAR_KEYWORD
    }
    try:
        # Tracing runs the forward's Python code (a counter, a cache): put back whatever it touched.
        with warnings.catch_warnings(), untouched(module):
            warnings.simplefilter("ignore")
            return _OneLevelTracer().trace(module, concrete_args=concrete or None)
    except Exception:  # failing to trace only means "not provably residual"
        return None


@dataclasses.dataclass(frozen=True)
class _Step:
    """One residual addition in a block's graph: ``add = shortcut + branch``."""

    add: fx.Node
    shortcut: fx.Node
    branch: fx.Node


class _Residuals:
    """Finds the chain of residual additions that produces a block's return value, and where to read each."""

    def __init__(self, name: str, module: nn.Module, graph: fx.Graph) -> None:
        self.name = name
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.x = placeholders[0] if placeholders else None
        self.modules = dict(module.named_modules())
        self.calls = Counter(str(n.target) for n in self.nodes if n.op == "call_module")
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}

    # graph queries
    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        if node not in self._ancestors:
            seen: set[fx.Node] = set()
            stack = [node]
            while stack:
                for a in _node_args(stack.pop()):
                    if a not in seen:
                        seen.add(a)
                        stack.append(a)
            self._ancestors[node] = seen
        return self._ancestors[node]

    def depends(self, node: fx.Node) -> bool:
        return node is self.x or self.x in self.ancestors(node)

    def kind(self, node: fx.Node) -> str:
        return type(self.modules.get(str(node.target))).__name__ if node.op == "call_module" else ""

    def once(self, node: fx.Node) -> bool:
        return node.op == "call_module" and self.calls[str(node.target)] == 1

    def passthrough(self, node: fx.Node) -> fx.Node | None:
        """The input of a shortcut-preserving step: a reshape-like op or an Identity module (one not named
        like a branch wrapper: ``drop_path`` or ``ls1`` are Identity when disabled, yet mark the branch)."""
        args = _node_args(node)
        if len(args) != 1:
            return None
        if _op_name(node) in _SHAPE:
            return args[0]
        if node.op == "call_module" and self.kind(node) == "Identity":
            return None if _BRANCH_NAME.search(str(node.target)) else args[0]
        return None

    def named_shortcut(self, node: fx.Node) -> bool:
        return node.op == "call_module" and bool(_SHORTCUT_NAME.search(str(node.target).lower()))

    def longer_branch(self, s: fx.Node, b: fx.Node) -> bool:
        """The branch is the longer path from the input; paths of equal length (parallel heads) only when the
        shortcut's name says so (``downsample``, ``shortcut``, ``proj``...)."""
        ls, lb = len(self.ancestors(s)), len(self.ancestors(b))
        return lb > ls or (lb == ls and self.named_shortcut(s) and not self.named_shortcut(b))

    def is_projection(self, node: fx.Node) -> bool:
        """Whether a shortcut is a module's output (a guess by path length) rather than the input or a sum."""
        while (inner := self.passthrough(node)) is not None:
            node = inner
        return node is not self.x and _op_name(node) not in _ADD

    # the chain of additions
    def chain(self, node: fx.Node, depth: int = 0) -> list[_Step] | None:
        if node is self.x:
            return []
        if depth > 64:
            return None
        if _op_name(node) in _ADD:
            ops = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(ops) != 2:
                return None  # x + constant
            options = []
            for s, b in ((ops[0], ops[1]), (ops[1], ops[0])):
                if not self.depends(b):
                    continue  # e.g. x + a learned embedding: not a residual addition
                if s is not self.x and not self.longer_branch(s, b):
                    continue
                sub = self.chain(s, depth + 1)
                if sub is not None:
                    rank = (0 if s is self.x else 1 if sub else 2, len(self.ancestors(s)), not self.named_shortcut(s))
                    options.append((rank, sub, s, b))
            if not options:
                return None
            _, sub, s, b = min(options, key=lambda o: o[0])
            return [*sub, _Step(node, s, b)]
        inner = self.passthrough(node)
        if inner is not None:
            return self.chain(inner, depth + 1)
        if node.op == "call_module" and self.depends(node) and not _DROP.match(self.kind(node)):
            return []  # a projection shortcut computed from the input
        return None

    def branch_source(self, node: fx.Node) -> tuple[fx.Node, bool]:
        """Walk back from an added branch through drops, layer scales and products with input-free factors."""
        scaled = False
        for _ in range(16):
            args = _node_args(node)
            if node.op == "call_module" and (_DROP.match(self.kind(node)) or self.kind(node) == "Identity") and args:
                node = args[0]
            elif node.op == "call_module" and _SCALE.match(self.kind(node)) and args:
                node, scaled = args[0], True
            elif _op_name(node) in _MUL and sum(self.depends(a) for a in args) == 1:
                node, scaled = next(a for a in args if self.depends(a)), True
            elif (
                _op_name(node) == "getitem"
                and len(node.args) == 2
                and node.args[1] == 0
                and isinstance(node.args[0], fx.Node)
                and node.args[0].op == "call_module"
            ):
                node = node.args[0]  # module returning a tuple: the recorder reads its first tensor
            else:
                break
        return node, scaled

    def site(self, node: fx.Node) -> Site | None:
        """A site holding exactly ``node``'s value: the input, a module called once, or a consumer's input."""
        if node is self.x:
            return Site(self.name, "input")
        if self.once(node):
            return Site(rel(self.name, str(node.target)))
        for user in node.users:
            if self.once(user) and user.args and user.args[0] is node:
                return Site(rel(self.name, str(user.target)), "input")
        return None

    def activation_after(self, after: list[fx.Node]) -> str:
        """"relu" when the only op after the last addition is a ReLU; "" when there is none; else its name (the
        residual identity cannot be checked through it)."""
        if not after:
            return ""
        if len(after) == 1:
            node = after[0]
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.ReLU) or _op_name(node) in ("relu", "relu_"):
                return "relu"
            inner = getattr(module, "graph", None)  # an exported module that is one relu op
            if isinstance(inner, fx.Graph):
                ops = [_op_name(n) for n in inner.nodes if n.op == "call_function"]
                if ops in (["relu"], ["relu_"]):
                    return "relu"
        return " then ".join(self.kind(n) or _op_name(n) for n in reversed(after))

    def taps(self) -> list[Tap] | None:
        outputs = [n for n in self.nodes if n.op == "output"]
        if self.x is None or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
            return None
        node, post = outputs[0].args[0], 0
        after: list[fx.Node] = []
        while _op_name(node) not in _ADD:  # single-input ops after the last add (an activation, a reshape)
            args = _node_args(node)
            if post >= 8 or node.op not in ("call_module", "call_function", "call_method") or len(args) != 1:
                return None
            after.append(node)
            node, post = args[0], post + 1
        steps = self.chain(node)
        if not steps:
            return None
        post_activation = self.activation_after(after)
        found: list[tuple[str, Site, Site | Difference, str, Site | None]] = []
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            shortcut = self.site(step.shortcut)
            output = Site(self.name) if last else self.site(step.add)
            if output is None or (not last and output.kind != "input"):
                continue  # an intermediate sum no hook can read
            source, scaled = self.branch_source(step.branch)
            if self.is_projection(step.shortcut) and not self.once(source):
                continue  # module vs computed value: which one is the skip is a guess; do not claim it
            if self.once(source) and source is not step.shortcut:
                target = str(source.target)
                before = " (before its scaling)" if scaled else ""
                found.append(
                    (
                        target,
                        output,
                        Site(rel(self.name, target)),
                        f"fallback (traced add): branch = {target}{before}",
                        shortcut,
                    )
                )
                continue
            exact = not (last and post)  # after a final activation, output - shortcut is not the branch
            inplace_on_shortcut = _op_name(step.add) in _INPLACE_ADD and step.add.args[0] is step.shortcut
            if exact and shortcut is not None and not inplace_on_shortcut:
                what = "input" if shortcut.kind == "input" and shortcut.module == self.name else str(shortcut)
                scaling = " (after its scaling)" if scaled else ""
                found.append(
                    (
                        f"add{i}",
                        output,
                        Difference(output, shortcut),
                        f"fallback (traced add): output - {what}{scaling}",
                        shortcut,
                    )
                )
        if not found:
            return None
        single = len(found) == 1
        return [
            make_tap(
                self.name,
                residual,
                label,
                output=output,
                suffix="" if single else f".{key.split('.')[-1]}",
                shortcut=shortcut,
                post_activation=post_activation if output == Site(self.name) else "",
            )
            for key, output, residual, label, shortcut in found
        ]


def traced_residual(name: str, module: nn.Module) -> list[Tap] | None:
    """Any module whose forward provably returns ``shortcut + branch`` (see the module docstring)."""
    graph = _graph_of(module)
    return _Residuals(name, module, graph).taps() if graph is not None else None

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
from typing import Any

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
_REORDER_FREE = {"reshape", "view", "flatten", "contiguous", "squeeze", "unsqueeze"}  # element order kept
_NORM_CLASS = re.compile(r"Norm")  # LayerNorm, RMSNorm, BatchNorm2d, GroupNorm, timm's LayerNorm2d, *RMSNorm
_ELEMENTWISE_OPS = {"relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu",
                    "mish", "dropout", "relu6", "hardtanh"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_function":
        packet = getattr(target, "overloadpacket", None)  # aten ops in torch.export graphs
        return getattr(packet if packet is not None else target, "__name__", "")
    return ""


def _node_args(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads, inside lists and tuples too (``torch.cat([a, b])``)."""
    out: list[fx.Node] = []
    stack = [*node.args, *node.kwargs.values()]
    while stack:
        a = stack.pop(0)
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack[:0] = list(a)
    return out


# Ops whose result holds no value of their tensor arguments, only their shape, dtype or device: a tensor made
# from them (``torch.zeros(x.shape[:-1])``, ``x.new_ones(...)``) does not depend on x's data.
_METADATA = {"size", "dim", "numel", "shape", "dtype", "device", "ndim", "ndimension"}
_CREATE = {"zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "full_like",
           "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "tensor", "randn", "rand", "randint",
           "randn_like", "rand_like"}


def _data_args(node: fx.Node) -> list[fx.Node]:
    """The tensors a node computes from: for a reshape-like op only its first argument (the others are sizes,
    often read off ``x.shape``); none for a shape query or a tensor creation (zeros of x's shape holds none of
    x's values: an embedding of such ids is not a branch computed from x)."""
    name = _op_name(node)
    if name in _METADATA or name in _CREATE:
        return []
    if node.op == "call_function" and name == "getattr" and len(node.args) > 1 and node.args[1] in _METADATA:
        return []
    if name in _SHAPE and node.args and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return _node_args(node)


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
    defaults = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty
                and p.kind != p.VAR_KEYWORD}
    # First with arguments that default to None left open (``forward(x, shortcut=None)``: a caller may pass the
    # tensor the block adds to), then with every default fixed (code that branches on them).
    attempts = [{k: v for k, v in defaults.items() if v is not None}, defaults]
    for concrete in attempts if attempts[0] != attempts[1] else attempts[1:]:
        try:
            # Tracing runs the forward's Python code (a counter, a cache): put back whatever it touched.
            with warnings.catch_warnings(), untouched(module):
                warnings.simplefilter("ignore")
                return _OneLevelTracer().trace(module, concrete_args=concrete or None)
        except Exception:  # failing to trace only means "not provably residual"
            continue
    return None


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a branch can be read: ``node``; whether a scale lies between it and the addition (and the parameter
    that is the scale, when it is exactly one), and the layout ops between them (source to added)."""

    node: fx.Node
    scaled: bool
    scale: str
    transforms: tuple[tuple[str, tuple[int, ...]], ...]


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
        self.arguments = {n: i for i, n in enumerate(placeholders)}  # a block may add into any of them
        self.modules = dict(module.named_modules())
        self.calls = Counter(str(n.target) for n in self.nodes if n.op == "call_module")
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}

    # graph queries
    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        if node not in self._ancestors:
            seen: set[fx.Node] = set()
            stack = [node]
            while stack:
                for a in _data_args(stack.pop()):
                    if a not in seen:
                        seen.add(a)
                        stack.append(a)
            self._ancestors[node] = seen
        return self._ancestors[node]

    def depends(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from the block's tensor arguments (not from parameters alone)."""
        return node in self.arguments or any(a in self.arguments for a in self.ancestors(node))

    def kind(self, node: fx.Node) -> str:
        return type(self.modules.get(str(node.target))).__name__ if node.op == "call_module" else ""

    def once(self, node: fx.Node) -> bool:
        return node.op == "call_module" and self.calls[str(node.target)] == 1

    def passthrough(self, node: fx.Node) -> fx.Node | None:
        """The input of a shortcut-preserving step: a reshape-like op (its sizes may come from ``x.shape``), an
        Identity module (one not named like a branch wrapper: ``drop_path`` or ``ls1`` are Identity when disabled,
        yet mark the branch), or a scale module on the shortcut (MetaFormer's ``res_scale``)."""
        args = _data_args(node)
        if len(args) != 1:
            return None
        if _op_name(node) in _SHAPE:
            return args[0]
        if node.op == "call_module" and self.kind(node) == "Identity":
            return None if _BRANCH_NAME.search(str(node.target)) else args[0]
        if node.op == "call_module" and _SCALE.match(self.kind(node)) and "res" in str(node.target).lower():
            return args[0]
        return None

    def named_shortcut(self, node: fx.Node) -> bool:
        return node.op == "call_module" and bool(_SHORTCUT_NAME.search(str(node.target).lower()))

    def longer_branch(self, s: fx.Node, b: fx.Node) -> bool:
        """The branch is the longer path from the input; paths of equal length (parallel heads) only when the
        shortcut's name says so (``downsample``, ``shortcut``, ``proj``...)."""
        ls, lb = len(self.ancestors(s)), len(self.ancestors(b))
        return lb > ls or (lb == ls and self.named_shortcut(s) and not self.named_shortcut(b))

    def is_projection(self, node: fx.Node) -> bool:
        """Whether a shortcut is a module's output (a guess by path length) rather than an argument or a sum."""
        while (inner := self.passthrough(node)) is not None:
            node = inner
        return node not in self.arguments and _op_name(node) not in _ADD

    # the chain of additions
    def chain(self, node: fx.Node, depth: int = 0) -> list[_Step] | None:
        if node in self.arguments:
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
                if s not in self.arguments and not self.longer_branch(s, b):
                    continue
                sub = self.chain(s, depth + 1)
                if sub is not None:
                    rank = (0 if s in self.arguments else 1 if sub else 2, len(self.ancestors(s)),
                            not self.named_shortcut(s))
                    options.append((rank, sub, s, b))
            if not options:
                return None
            _, sub, s, b = min(options, key=lambda o: o[0])
            return [*sub, _Step(node, s, b)]
        inner = self.passthrough(node)
        if inner is not None:
            return self.chain(inner, depth + 1)
        normed = self.post_norm_input(node)
        if normed is not None:  # LN(x + f(x)) feeds the next addition: a post-norm block adds twice
            return self.chain(normed, depth + 1)
        if node.op == "call_module" and self.depends(node) and not _DROP.match(self.kind(node)):
            return []  # a projection shortcut computed from the input
        return None

    def post_norm_input(self, node: fx.Node) -> fx.Node | None:
        """The addition a norm module normalises, when ``node`` is such a norm called once and the sum goes
        nowhere else (a post-norm block: the norm's output is the stream; a pre-norm block's sum also feeds the
        next addition)."""
        if node.op != "call_module" or not self.once(node) or not _NORM_CLASS.search(self.kind(node)):
            return None
        args = _data_args(node)
        if len(args) != 1 or _op_name(args[0]) not in _ADD or len(args[0].users) != 1:
            return None
        return args[0]

    def stream_note(self, add: fx.Node) -> str:
        """What a post-norm tap's stream holds: the norm's input, i.e. the sum before the norm."""
        for user in add.users:
            if self.post_norm_input(user) is add:
                return f"{self.kind(user)} input (post-norm: the sum before the norm)"
        return ""

    def branch_source(self, node: fx.Node) -> _Source:
        """Walk back from an added branch through drops, layer scales, products with input-free factors and
        transposes / permutes, to the value a module returns (read there: before the scaling)."""
        scaled, scale = False, ""
        transforms: list[tuple[str, tuple[int, ...]]] = []
        for _ in range(24):
            args = _node_args(node)
            name = _op_name(node)
            if node.op == "call_module" and (_DROP.match(self.kind(node)) or self.kind(node) == "Identity") and args:
                node = args[0]
            elif node.op == "call_module" and _SCALE.match(self.kind(node)) and args:
                module = self.modules.get(str(node.target))
                param = next((n for n in ("gamma", "weight", "scale") if isinstance(getattr(module, n, None),
                                                                                  torch.Tensor)), "")
                if not scaled and not transforms and param:
                    scale = f"{node.target}.{param}"
                node, scaled = args[0], True
            elif name in _MUL and sum(self.depends(a) for a in args) == 1:
                factor = next((a for a in args if not self.depends(a)), None)
                numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
                if not scaled and not transforms:
                    if factor is not None and factor.op == "get_attr":
                        scale = str(factor.target)
                    elif factor is None and len(numbers) == 1 and len(node.args) == 2:
                        scale = repr(float(numbers[0]))  # a constant factor, e.g. 0.5 * f(x)
                node, scaled = next(a for a in args if self.depends(a)), True
            elif name in ("transpose", "permute", "contiguous") and node.args and isinstance(node.args[0], fx.Node):
                dims = tuple(a for a in node.args[1:] if isinstance(a, int))
                if name == "permute" and len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
                    dims = tuple(int(d) for d in node.args[1])
                if name != "contiguous":
                    if not dims or (name == "transpose" and len(dims) != 2):
                        break
                    transforms.insert(0, (name, dims))
                node = node.args[0]
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
        return _Source(node, scaled, scale if scaled else "", tuple(transforms))

    def site(self, node: fx.Node) -> Site | None:
        """A site holding exactly ``node``'s value: the input, a module called once, or a consumer's input."""
        if node in self.arguments:
            return Site(self.name, "input", self.arguments[node])
        if self.once(node):
            return Site(rel(self.name, str(node.target)))
        for user in node.users:
            if self.once(user) and user.args and user.args[0] is node:
                return Site(rel(self.name, str(user.target)), "input")
        return None

    def elementwise(self, node: fx.Node) -> bool:
        """An activation, dropout or identity: applied to the sum, it leaves a post-activation stream."""
        if node.op == "call_module":
            from spp.axes import PASS_THROUGH, layer_evidence

            module = self.modules.get(str(node.target))
            if module is None:
                return False
            if _single_op(module) in _ELEMENTWISE_OPS:  # an exported module that is one activation op
                return True
            return layer_evidence(module, "output") == PASS_THROUGH and "Pool" not in type(module).__name__
        return _op_name(node) in _ELEMENTWISE_OPS

    def activation_after(self, after: list[fx.Node]) -> str:
        """"relu" when the only op after the last addition is a ReLU; "" when there is none; else its name (the
        residual identity cannot be checked through it)."""
        if not after or all(_op_name(n) in _REORDER_FREE for n in after):
            return ""  # nothing, or reshapes that keep the element order: the identity checks as it is
        if len(after) == 1:
            node = after[0]
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.ReLU) or _op_name(node) in ("relu", "relu_"):
                return "relu"
            if module is not None and _single_op(module) in ("relu", "relu_"):  # an exported relu module
                return "relu"
        return " then ".join(self.kind(n) or _op_name(n) for n in reversed(after))

    def taps(self) -> list[Tap] | None:
        outputs = [n for n in self.nodes if n.op == "output"]
        if self.x is None or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
            return None
        node, post = outputs[0].args[0], 0
        after: list[fx.Node] = []
        while _op_name(node) not in _ADD:  # single-input ops after the last add (an activation, a reshape)
            args = _data_args(node)
            if post >= 8 or node.op not in ("call_module", "call_function", "call_method") or len(args) != 1:
                return None
            after.append(node)
            node, post = args[0], post + 1
        steps = self.chain(node)
        if not steps:
            return None
        if after and self.post_norm_input(after[-1]) is node:
            after = []  # LN(x + f(x)) ends the block: the stream is read at the norm's input, before it
            last_output = self.site(node)
        elif all(self.elementwise(n) or _op_name(n) in _SHAPE for n in after):
            last_output = Site(self.name)  # the sum, after an activation (post-activation blocks) or a reshape
        else:
            last_output = self.site(node)  # a head or another layer follows: only a site holding the sum will do
            after = []
        post_activation = self.activation_after(after)
        found: list[dict[str, Any]] = []
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            shortcut = self.site(step.shortcut)
            output = last_output if last else self.site(step.add)
            if output is None or (not last and output.kind != "input"):
                continue  # an intermediate sum no hook can read
            stream = self.stream_note(step.add)
            src = self.branch_source(step.branch)
            source = src.node
            if self.is_projection(step.shortcut) and not self.once(source):
                continue  # module vs computed value: which one is the skip is a guess; do not claim it
            if self.once(source) and source is not step.shortcut:
                target = str(source.target)
                before = " (before its scaling)" if src.scaled else ""
                layout = f", then {self.describe(src.transforms)}" if src.transforms else ""
                found.append({"key": target, "output": output, "residual": Site(rel(self.name, target)),
                              "label": f"fallback (traced add): branch = {target}{layout}{before}",
                              "shortcut": shortcut, "residual_transforms": src.transforms, "stream": stream})
                continue
            exact = not (last and post)  # after a final activation, output - shortcut is not the branch
            inplace_on_shortcut = _op_name(step.add) in _INPLACE_ADD and step.add.args[0] is step.shortcut
            if exact and shortcut is not None and not inplace_on_shortcut:
                what = "input" if shortcut.kind == "input" and shortcut.module == self.name else str(shortcut)
                entry = {"key": f"add{i}", "output": output, "residual": Difference(output, shortcut),
                         "label": f"fallback (traced add): output - {what}", "shortcut": shortcut, "stream": stream}
                if src.scaled and src.scale:
                    entry["label"] = f"{entry['label']}, divided by {src.scale} (before its scaling)"
                    numeric = src.scale.replace(".", "", 1).lstrip("-").isdigit()
                    entry["residual_scale"] = src.scale if numeric else rel(self.name, src.scale)
                elif src.scaled:
                    entry["refusal"] = ("its branch is scaled by a factor spp cannot undo, and no module returns the "
                                        "branch before the scale: output - shortcut would be the scaled branch")
                found.append(entry)
        if not found:
            return None
        adds = sum(1 for n in self.nodes if _op_name(n) in _ADD and self.both_computed(n))
        unread = adds - len(found)
        note = f"{unread} more addition(s) in this block are not read (no site holds their sum)" if unread > 0 else ""
        single = len(found) == 1
        return [
            make_tap(
                self.name,
                f["residual"],
                f["label"],
                output=f["output"],
                suffix="" if single else f".{f['key'].split('.')[-1]}",
                shortcut=f["shortcut"],
                post_activation=post_activation if f["output"] == Site(self.name) else "",
                stream=f.get("stream", ""),
                residual_transforms=f.get("residual_transforms", ()),
                residual_scale=f.get("residual_scale", ""),
                refusal=f.get("refusal", ""),
                note=note,
            )
            for f in found
        ]

    def both_computed(self, node: fx.Node) -> bool:
        """An addition of two tensors computed from the block's arguments (not of a parameter or a constant)."""
        ops = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        return len(ops) == 2 and all(self.depends(a) for a in ops)

    @staticmethod
    def describe(transforms: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
        return ", ".join(f"{name}{dims}" for name, dims in transforms)


_EMBEDDING_CLASS = re.compile(r"Embedding")  # HF's *Embeddings, timm's *Embedding: ids or patches to vectors


def traced_residual(name: str, module: nn.Module) -> list[Tap] | None:
    """Any module whose forward provably returns ``shortcut + branch`` (see the module docstring). Embedding
    modules are never blocks: they sum lookup tables (word + position + token type), the stream's start, and
    their optional ``inputs_embeds`` argument would pass for a shortcut."""
    if _EMBEDDING_CLASS.search(type(module).__name__):
        return None
    graph = _graph_of(module)
    return _Residuals(name, module, graph).taps() if graph is not None else None


def _single_op(module: nn.Module) -> str:
    """The one op an exported / traced module's graph runs ("" when it runs more, or is not a graph module)."""
    inner = getattr(module, "graph", None)
    if not isinstance(inner, fx.Graph):
        return ""
    ops = [_op_name(n) for n in inner.nodes if n.op in ("call_function", "call_method", "call_module")]
    return ops[0] if len(ops) == 1 else ""


def adds_in(module: nn.Module) -> int:
    """How many additions of two input-dependent tensors ``module``'s own forward makes (0 when it cannot be
    traced): what tells a model with no residual connection from one whose blocks no rule can read."""
    graph = _graph_of(module)
    if graph is None:
        return 0
    r = _Residuals("", module, graph)
    return sum(1 for node in r.nodes if _op_name(node) in _ADD and r.both_computed(node))

"""Discovery rules for HuggingFace transformers: each layer's residual stream, read off its own ``forward`` code.

Why not child names alone: HF layers share names but not dataflow. OLMo2's ``post_attention_layernorm``
normalises the branch, GPT-NeoX switches to parallel residuals on a config flag, Granite scales the branch,
BERT adds inside ``BertSelfOutput(hidden, input_tensor)``. Why not torch.fx: HF wraps every layer's forward as
``(*args, **kwargs)`` for gradient checkpointing, and attention modules return tuples fx cannot unpack.

So the rule parses the layer's own (unwrapped) ``forward`` with ``ast`` and interprets it symbolically, one level
deep: children are opaque calls, ``if self.<flag>`` / ``if self.config.<flag>`` is decided on the module, the
layer's own methods are inlined (BERT's ``feed_forward_chunk``), and a child that receives the stream as an
argument is analysed the same way (BERT's ``BertSelfOutput``, BLOOM's ``mlp(h, residual)``). An addition is a
residual addition when one term (the shortcut: the layer input or an earlier sum) feeds every other term
through a child call; several branch terms added at once make a parallel block (GPT-J, Phi, Falcon, Cohere,
GPT-NeoX with ``use_parallel_residual``), read as one tap: output - input. A layer is claimed only when its
additions form one chain from its input to what it returns, every site is a module called once, and the stream
feeds a LayerNorm / RMSNorm / Linear (or, in a layer without convolutions, a child holding a Linear): tokens
(B, L, C), channels last. An ``if`` the module cannot decide is followed on both sides when neither runs a child;
``if encoder_hidden_states is not None:`` around children the layer owns (cross-attention) is assumed true, as
an encoder-decoder model passes it, and the taps read there say so. What the interpreter cannot follow is not
claimed; a layer it proves residual but cannot read (a branch that runs only for some calls, a sum no hook sees, a
chunked feed-forward, layers shared across depth) is refused with an SppError.

Every tap carries ``residual`` (the branch before any scale and before the add: the child's output, the first
tensor where it returns a tuple), ``output`` (a site holding exactly the sum; for post-norm layers the norm's
input, said in ``stream``), ``shortcut`` (a site holding what the branch is added to) and ``branch``.
Importing this module imports torch but not transformers.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import itertools
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from spp.errors import SppError
from spp.taps import Difference, Site, Tap

_MAX_INLINE = 4  # depth of inlined self-methods
_MAX_NESTED = 3  # depth of children analysed because they receive the stream
_MISSING = object()
_UNKNOWN = object()  # a value spp cannot know before the call (self.training, a tensor's truth)

_NORM = re.compile(r"(rms|layer|scale)_?norm", re.IGNORECASE)
_DROP = re.compile(r"drop(out|_?path)|stochasticdepth", re.IGNORECASE)
_LAYER_SCALE = re.compile(r"layer_?scale", re.IGNORECASE)
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder_attn", re.IGNORECASE)
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MIXER = re.compile(r"mixer|ssm|mamba|temporal|lstm|recurren", re.IGNORECASE)
_RESHAPE_METHODS = {"view", "reshape", "contiguous", "view_as", "reshape_as"}
_CAST_METHODS = {"to", "type", "type_as", "float", "half", "bfloat16", "clone", "detach"}
_META_METHODS = {"size", "dim", "numel", "get_device", "is_contiguous", "stride", "element_size"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


class _Unsupported(Exception):
    """The forward does something the interpreter does not follow; ``residual``: an add on the stream was seen."""

    def __init__(self, reason: str, residual: bool = False) -> None:
        super().__init__(reason)
        self.residual = residual


class _DeadPath(Exception):
    """This path calls an attribute the module does not have: it would raise, so no successful forward takes it."""


_seq = itertools.count()


@dataclass(eq=False)
class _V:
    """A symbolic value in a forward: where it comes from (``op``) and what it was computed from (``args``)."""

    op: str  # param const self module method call item tuple add scale pass opaque phi meta cond unit
    args: tuple[_V, ...] = ()
    name: str = ""  # param: its name; call/module/unit: child path; pass: kind; scale: what scales
    index: int = 0  # param: position (-1: keyword-only); item: index
    value: Any = None  # const/module/method: the object; call: _Call; unit: _Unit; cond: True/False/None
    stream: bool = False  # possibly the residual stream
    seq: int = field(default_factory=lambda: next(_seq))


@dataclass(eq=False)
class _Call:
    path: str  # the child's name relative to the analysed module
    module: nn.Module
    positional: list[_V]
    keywords: dict[str, _V]


@dataclass
class _Unit:
    """A child (or the layer itself) proven residual: its taps, and what its output holds."""

    taps: list[Tap]
    channels_last: bool


# ---- helpers -----------------------------------------------------------------------------------------------


def _from_transformers(module: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(module).__mro__[:-2])


def _torch_native(module: nn.Module) -> bool:
    return type(module).forward.__module__.startswith("torch.")


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return bool(_NORM.search(name)) and "batch" not in name.lower() and "group" not in name.lower()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D: a linear on C


def _is_drop(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) or bool(_DROP.search(type(module).__name__))


def _passthrough(module: nn.Module) -> bool:
    """Modules that return their input in eval (identity, dropout, drop path) or only scale it (layer scale)."""
    return isinstance(module, nn.Identity) or _is_drop(module) or bool(_LAYER_SCALE.search(type(module).__name__))


def _is_layer_class(module: nn.Module) -> bool:
    """HF marks its layers by subclassing GradientCheckpointingLayer (transformers >= 4.52)."""
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__)


def _join(prefix: str, rel: str) -> str:
    if not rel:
        return prefix
    return f"{prefix}.{rel}" if prefix else rel


def _unwrap(fn: Any) -> Any:
    for _ in range(8):
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return fn


@functools.lru_cache(maxsize=512)
def _parse(fn: Callable) -> ast.FunctionDef | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.FunctionDef) else None


def _forward(module: nn.Module) -> Callable:
    return _unwrap(type(module).forward)


def _param_names(fn: Callable) -> list[str]:
    tree = _parse(fn)
    if tree is None:
        return []
    return [a.arg for a in (*tree.args.posonlyargs, *tree.args.args)][1:]  # without self


def _param_position(module: nn.Module, key: int | str) -> int | str | None:
    """The position (after self) of a forward argument given by position or keyword; the keyword if keyword-only."""
    names = _param_names(_forward(module))
    if isinstance(key, int):
        return key if key < len(names) else None
    if key in names:
        return names.index(key)
    tree = _parse(_forward(module))
    if tree is not None and any(a.arg == key for a in tree.args.kwonlyargs):
        return key
    return None


def _own_nodes(tree: ast.AST) -> list[ast.AST]:
    """The nodes of a function body, without those of functions defined inside it."""
    found, stack = [], list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


@functools.lru_cache(maxsize=512)
def _returns_tuple(fn: Callable) -> bool:
    """Whether every ``return`` of ``fn`` is a tuple (a literal, or a name only ever assigned tuples)."""
    tree = _parse(fn)
    if tree is None:
        return False
    assigned: dict[str, list[ast.expr]] = {}
    returns: list[ast.expr | None] = []
    for node in _own_nodes(tree):
        if isinstance(node, ast.Return):
            returns.append(node.value)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    assigned.setdefault(t.id, []).append(node.value)

    def extends(expr: ast.expr, name: str) -> bool:  # outputs = outputs + (x,)
        return isinstance(expr, ast.BinOp) and isinstance(expr.left, ast.Name) and expr.left.id == name

    def is_tuple(expr: ast.expr | None, depth: int = 0) -> bool:
        if isinstance(expr, (ast.Tuple, ast.List)):
            return True
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return is_tuple(expr.left, depth)
        if isinstance(expr, ast.IfExp):
            return is_tuple(expr.body, depth) and is_tuple(expr.orelse, depth)
        if isinstance(expr, ast.Name) and depth < 4:
            values = [v for v in assigned.get(expr.id, []) if not extends(v, expr.id)]
            return bool(values) and all(is_tuple(v, depth + 1) for v in values)
        return False

    return bool(returns) and all(is_tuple(r) for r in returns)


def _module_returns_tuple(module: nn.Module) -> bool:
    return _returns_tuple(_forward(module))


# ---- the interpreter ---------------------------------------------------------------------------------------


class _Flow:
    """Symbolic run of one module's forward; children are opaque, the stream is traced through additions."""

    def __init__(
        self, module: nn.Module, prefix: str, stream_param: int | str, depth: int, nested: bool, root: tuple[str, str]
    ) -> None:
        self.module = module
        self.prefix = prefix  # qualified name of ``module`` in the model
        self.root = root  # (qualified name, class name) of the layer being claimed
        self.stream_param = stream_param
        self.depth = depth
        self.nested = nested
        self.calls: list[_Call] = []
        self.nodes: list[_V] = []
        self.adds: list[_V] = []
        self.units: list[_V] = []
        self.env: dict[str, _V] = {}
        self.globals: dict[str, Any] = {}
        self.returned: _V | None = None
        self.inline_depth = 0
        self.stream_input: _V | None = None
        self.unit_inputs: dict[int, _V] = {}  # unit value -> the value that carried the stream into it
        # (first node, end node, condition assumed true, qualified names of the modules that run only then)
        self.assumed: list[tuple[int, int, str, frozenset[str]]] = []
        self.saw_stream_add = False
        self._paths: dict[int, str] | None = None

    # -- values
    def new(self, op: str, args: tuple[_V, ...] = (), **kw: Any) -> _V:
        stream = kw.pop("stream", None)
        if stream is None:
            stream = op in ("add", "pass", "phi", "scale") and any(a.stream for a in args)
        v = _V(op, args, stream=stream, **kw)
        self.nodes.append(v)
        if op == "add" and stream:
            self.saw_stream_add = True
        return v

    def const(self, value: Any) -> _V:
        return _V("const", value=value)

    def opaque(self, *parts: _V) -> _V:
        return self.new("opaque", tuple(p for p in parts if p.op not in ("const", "meta", "self", "module", "method")))

    def path_of(self, module: nn.Module) -> str | None:
        if self._paths is None:  # the first name, as named_modules() (and so the recorder) sees it
            self._paths = {}
            for n, m in self.module.named_modules(remove_duplicate=False):
                self._paths.setdefault(id(m), n)
        return self._paths.get(id(module))

    def wrap(self, obj: Any) -> _V:
        if obj is _UNKNOWN:
            return _V("cond", value=None)
        if isinstance(obj, nn.Module):
            path = self.path_of(obj)
            if path is None:
                raise _Unsupported(f"calls a module that is not its child ({type(obj).__name__})")
            return _V("module", name=path, value=obj)
        if inspect.ismethod(obj) and obj.__self__ is self.module:
            return _V("method", value=obj)
        return _V("const", value=obj)

    # -- running
    def run(self) -> None:
        fn = _forward(self.module)
        tree = _parse(fn)
        if tree is None:
            raise _Unsupported("its forward has no readable source")
        self.globals = getattr(fn, "__globals__", {})
        args = tree.args
        positional = [a.arg for a in (*args.posonlyargs, *args.args)]
        if not positional:
            raise _Unsupported("forward takes no self")
        env: dict[str, _V] = {positional[0]: _V("self")}
        for i, pname in enumerate(positional[1:]):
            is_stream = i == self.stream_param or pname == self.stream_param
            env[pname] = self.new("param", name=pname, index=i, stream=is_stream)
            if is_stream:
                self.stream_input = env[pname]
        for a in args.kwonlyargs:
            is_stream = a.arg == self.stream_param
            env[a.arg] = self.new("param", name=a.arg, index=-1, stream=is_stream)
            if is_stream:
                self.stream_input = env[a.arg]
        for extra in (args.vararg, args.kwarg):
            if extra is not None:
                env[extra.arg] = self.new("param", name=extra.arg, index=-1)
        if self.stream_input is None:
            raise _Unsupported("no such stream argument")
        self.env = env
        try:
            status = self.block(tree.body)
        except _DeadPath:
            raise _Unsupported("its forward calls an attribute it does not have") from None
        if status != "return":
            raise _Unsupported("forward never returns a value")

    def block(self, stmts: list[ast.stmt]) -> str | None:
        for stmt in stmts:
            status = self.stmt(stmt)
            if status:
                return status
        return None

    def branch(self, stmts: list[ast.stmt]) -> str | None:
        """One side of an undecided ``if``: a side calling a missing attribute counts as raising."""
        try:
            return self.block(stmts)
        except _DeadPath:
            return "raise"

    def stmt(self, s: ast.stmt) -> str | None:
        if isinstance(s, ast.Assign):
            value = self.ev(s.value)
            for target in s.targets:
                self.bind(target, value)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self.bind(s.target, self.ev(s.value))
        elif isinstance(s, ast.AugAssign):
            if not isinstance(s.target, ast.Name):
                self.ev(s.value)
                return None
            old, rhs = self.ev(s.target), self.ev(s.value)
            self.env[s.target.id] = self.binop(s.op, old, rhs)
        elif isinstance(s, ast.Expr):
            self.ev(s.value)
        elif isinstance(s, ast.If):
            return self.if_(s)
        elif isinstance(s, ast.Return):
            self.returned = self.ev(s.value) if s.value is not None else self.const(None)
            return "return"
        elif isinstance(s, ast.Raise):
            return "raise"
        elif isinstance(s, ast.With):
            for item in s.items:
                self.ev(item.context_expr)
            return self.block(s.body)
        elif isinstance(s, (ast.Pass, ast.Assert, ast.Delete, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
            return None
        else:
            raise _Unsupported(f"a {type(s).__name__.lower()} statement in its forward", self.saw_stream_add)
        return None

    def bind(self, target: ast.expr, value: _V) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for i, t in enumerate(target.elts):
                if isinstance(t, ast.Starred):
                    self.bind(t.value, self.opaque(value))
                elif value.op == "tuple" and i < len(value.args):
                    self.bind(t, value.args[i])
                else:
                    unpacked = self.item(value, i)
                    unpacked.name = "unpacked"  # `a, b = call(...)`: the call returned a sequence
                    self.bind(t, unpacked)
        # attribute / subscript targets (self.x = ..., d[k] = ...) do not touch local values

    def item(self, base: _V, i: int) -> _V:
        return self.new("item", (base,), index=i, stream=base.op == "unit" and i == 0)

    def snapshot(self) -> tuple[int, int, tuple[list, list, list, list, dict[str, _V]], _V | None]:
        """The interpreter's state (copies), to run both sides of an undecided ``if`` and keep one."""
        lists = (list(self.calls), list(self.nodes), list(self.adds), list(self.units), dict(self.env))
        return len(self.calls), len(self.nodes), lists, self.returned

    def rewind(self, snap: tuple) -> None:
        calls, nodes, adds, units, env = snap[2]
        self.calls, self.nodes, self.adds, self.units = list(calls), list(nodes), list(adds), list(units)
        self.env, self.returned = dict(env), snap[3]

    def if_(self, s: ast.If) -> str | None:
        decided = self.cond(s.test)
        if decided is True:
            return self.block(s.body)
        if decided is False:
            return self.block(s.orelse)
        start = self.snapshot()
        first = self.branch(s.body)
        after_body = self.snapshot()
        body_calls = len(self.calls) > start[0]
        self.rewind(start)
        second = self.branch(s.orelse)
        else_calls = len(self.calls) > start[0]
        test = ast.unparse(s.test)
        if first == "raise":  # only the other path returns normally
            return second
        if second == "raise":
            self.rewind(after_body)
            return first
        presence = self.presence(s.test)
        if presence is not None and body_calls != else_calls and not (first or second):
            # `if encoder_hidden_states is not None:` around a cross-attention the layer owns: take the path
            # that runs it (an encoder-decoder model passes the argument); its taps stay empty otherwise
            taken_body = body_calls
            if taken_body:
                self.rewind(after_body)
            holds = test if taken_body else f"not ({test})"
            conditional = frozenset(_join(self.prefix, c.path) for c in self.calls[start[0] :])
            self.assumed.append((start[1], len(self.nodes), holds, conditional))
            return None
        if body_calls or else_calls:
            raise _Unsupported(f"child modules run only when `{test}`, which spp cannot know", self.saw_stream_add)
        if first == "return" and second == "return":
            self.returned = self.new("phi", (after_body[3], self.returned))  # type: ignore[arg-type]
            return "return"
        if first or second:
            raise _Unsupported(f"it returns early when `{test}`", self.saw_stream_add)
        else_env, body_env = self.env, after_body[2][4]
        for key in set(body_env) | set(else_env):
            a, b = body_env.get(key), else_env.get(key)
            if a is not b and a is not None and b is not None:
                self.env[key] = self.new("phi", (a, b))
            elif a is not None:
                self.env[key] = a
        return None

    def presence(self, test: ast.expr) -> bool | None:
        """For ``if x is not None`` (possibly ``and``-ed with decided flags) on an argument: True, or False for
        ``is None``; None for any other test."""
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            found = [self.presence(v) for v in test.values]
            undecided = [f for f, v in zip(found, test.values, strict=True) if self.cond(v) is not True]
            return undecided[0] if len(undecided) == 1 else None
        if (
            isinstance(test, ast.Compare)
            and len(test.ops) == 1
            and isinstance(test.ops[0], (ast.Is, ast.IsNot))
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None
            and isinstance(test.left, ast.Name)
            and getattr(self.env.get(test.left.id), "op", "") == "param"
        ):
            return isinstance(test.ops[0], ast.IsNot)
        return None

    # -- conditions: True / False / None (unknown)
    def cond(self, node: ast.expr) -> bool | None:
        if isinstance(node, ast.BoolOp):
            values = [self.cond(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return False if False in values else (None if None in values else True)
            return True if True in values else (None if None in values else False)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.cond(node.operand)
            return None if inner is None else not inner
        known, value = self.constant(node)
        if not known:
            return None
        try:
            return bool(value)
        except Exception:  # a tensor, an ambiguous truth value
            return None

    def constant(self, node: ast.expr) -> tuple[bool, Any]:
        """A Python value decided by the module alone (config flags, constants), or (False, None)."""
        if isinstance(node, ast.Constant):
            return True, node.value
        if isinstance(node, ast.Name):
            v = self.env.get(node.id)
            if v is None:
                obj = self.globals.get(node.id, getattr(builtins, node.id, _MISSING))
                return (obj is not _MISSING), obj
            if v.op == "cond":
                return (v.value is not None), v.value
            if v.op in ("const", "module", "method") and v.value is not _MISSING and v.value is not _UNKNOWN:
                return True, v.value
            return False, None
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            found, obj = self.self_chain(node)
            if found:
                return (obj is not _UNKNOWN and obj is not _MISSING), obj
            if isinstance(node, ast.Attribute):
                known, base = self.constant(node.value)
                if known:
                    obj = getattr(base, node.attr, _MISSING)
                    return obj is not _MISSING, obj
            return False, None
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            lk, left = self.constant(node.left)
            rk, right = self.constant(node.comparators[0])
            if not (lk and rk):
                return False, None
            op = node.ops[0]
            try:
                result = {
                    ast.Is: lambda: left is right,
                    ast.IsNot: lambda: left is not right,
                    ast.Eq: lambda: left == right,
                    ast.NotEq: lambda: left != right,
                    ast.Lt: lambda: left < right,
                    ast.LtE: lambda: left <= right,
                    ast.Gt: lambda: left > right,
                    ast.GtE: lambda: left >= right,
                    ast.In: lambda: left in right,
                    ast.NotIn: lambda: left not in right,
                }[type(op)]()
                return True, bool(result)
            except Exception:
                return False, None
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("hasattr", "getattr")
            and len(node.args) >= 2
            and self.is_self(node.args[0])
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            attr = node.args[1].value
            if attr == "training":
                return False, None
            if node.func.id == "hasattr":
                return True, hasattr(self.module, attr)
            if len(node.args) == 3:
                known, default = self.constant(node.args[2])
                if known:
                    return True, getattr(self.module, attr, default)
            return hasattr(self.module, attr), getattr(self.module, attr, None)
        if isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
            c = self.cond(node)
            return c is not None, c
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            known, value = self.constant(node.operand)
            if known and isinstance(value, (int, float)):
                return True, -value
        return False, None

    def is_self(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and getattr(self.env.get(node.id), "op", "") == "self"

    def self_chain(self, node: ast.expr) -> tuple[bool, Any]:
        """``self.a.b[0]`` -> (True, the object) without evaluating data; ``self.training`` is unknown."""
        parts: list[str | int] = []
        while True:
            if isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            elif isinstance(node, ast.Subscript):
                idx = node.slice
                if isinstance(idx, ast.Constant) and isinstance(idx.value, int):
                    parts.append(idx.value)
                elif (
                    isinstance(idx, ast.UnaryOp)
                    and isinstance(idx.op, ast.USub)
                    and isinstance(idx.operand, ast.Constant)
                    and isinstance(idx.operand.value, int)
                ):
                    parts.append(-idx.operand.value)
                else:
                    return False, None
                node = node.value
            else:
                break
        if not self.is_self(node):
            return False, None
        obj: Any = self.module
        for part in reversed(parts):
            if isinstance(part, int):
                try:
                    obj = obj[part]
                except Exception:
                    return True, _MISSING
            else:
                if part == "training":
                    return True, _UNKNOWN
                obj = getattr(obj, part, _MISSING)
                if obj is _MISSING:
                    return True, _MISSING
        return True, obj

    # -- expressions
    def ev(self, node: ast.expr) -> _V:
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            return self.const(self.globals.get(node.id, getattr(builtins, node.id, _MISSING)))
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            found, obj = self.self_chain(node)
            if found:
                return self.wrap(obj)
            if isinstance(node, ast.Attribute):
                base = self.ev(node.value)
                if base.op == "const":
                    return self.const(getattr(base.value, node.attr, _MISSING))
                if node.attr in _META_ATTRS:
                    return _V("meta")
                return self.opaque(base)
            base = self.ev(node.value)
            index = node.slice
            if isinstance(index, ast.Constant) and isinstance(index.value, int) and base.op not in ("const", "meta"):
                if base.op == "tuple":
                    return base.args[index.value] if -len(base.args) <= index.value < len(base.args) else self.opaque()
                return self.item(base, index.value)
            return self.opaque(base, self.ev(index))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node.op, self.ev(node.left), self.ev(node.right), node)
        if isinstance(node, (ast.Tuple, ast.List)):
            return self.new("tuple", tuple(self.ev(e) for e in node.elts))
        if isinstance(node, ast.Starred):
            return self.ev(node.value)
        if isinstance(node, ast.IfExp):
            decided = self.cond(node.test)
            if decided is True:
                return self.ev(node.body)
            if decided is False:
                return self.ev(node.orelse)
            before = len(self.calls)
            a, b = self.ev(node.body), self.ev(node.orelse)
            if len(self.calls) > before:
                raise _Unsupported(f"a child runs only when `{ast.unparse(node.test)}`", self.saw_stream_add)
            return self.new("phi", (a, b))
        if isinstance(node, (ast.BoolOp, ast.Compare, ast.UnaryOp)):
            if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
                return self.opaque(self.ev(node.operand))
            c = self.cond(node)
            if c is not None:
                return _V("cond", value=c)
            parts = [self.ev(n) for n in ast.iter_child_nodes(node) if isinstance(n, ast.expr)]
            return _V("cond", value=None, args=tuple(p for p in parts if p.op not in ("const", "meta")))
        if isinstance(node, ast.Dict):
            return self.opaque(*(self.ev(v) for v in node.values if v is not None))
        if isinstance(node, ast.Slice):
            return self.opaque(*(self.ev(x) for x in (node.lower, node.upper, node.step) if x is not None))
        if isinstance(node, ast.JoinedStr | ast.Lambda):
            return self.const(_MISSING)
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)):
            return self.opaque()
        raise _Unsupported(f"a {type(node).__name__} expression", self.saw_stream_add)

    def binop(self, op: ast.operator, left: _V, right: _V, node: ast.BinOp | None = None) -> _V:
        if isinstance(op, ast.Add):
            if _tuplish(left):  # (x,) + rest: the first element stays first
                return self.concat(left, right)
            if left.op == "const" or right.op in ("const", "tuple"):
                return self.opaque(left, right)  # x + 1
            v = self.new("add", (left, right))
            self.adds.append(v)
            return v
        data_left = self.has_data(left)
        data_right = self.has_data(right)
        if isinstance(op, (ast.Mult, ast.Div)) and data_left != data_right:
            data, factor = (left, right) if data_left else (right, left)
            if isinstance(op, ast.Div) and data is right:
                return self.opaque(left, right)
            text = ""
            if node is not None:
                text = ast.unparse(node.right if data is left else node.left)
            name = self.describe(factor, text)
            return self.new("scale", (data,), name=f"1/({name})" if isinstance(op, ast.Div) else name)
        return self.opaque(left, right)

    def concat(self, left: _V, right: _V) -> _V:
        """``left + right`` for a tuple (or either-or tuples: ``outputs += (x,)`` under an undecided ``if``)."""
        if left.op == "phi":
            return self.new("phi", tuple(self.concat(a, right) for a in left.args))
        tail = right.args if right.op == "tuple" else (self.opaque(right),)
        return self.new("tuple", (*left.args, *tail))

    def has_data(self, v: _V) -> bool:
        return v.op not in ("const", "meta", "self", "module", "method", "cond")

    def describe(self, v: _V, text: str) -> str:
        """A factor as the user can find it: ``self.residual_multiplier = 0.22``."""
        if v.op == "const" and isinstance(v.value, (int, float)) and not isinstance(v.value, bool):
            return f"{text} = {v.value:g}" if text and text != repr(v.value) else f"{v.value:g}"
        return text or "a constant factor"

    # -- calls
    def call(self, node: ast.Call) -> _V:
        args: list[_V] = []
        for a in node.args:
            value = self.ev(a)
            if isinstance(a, ast.Starred) and value.op == "tuple":
                args.extend(value.args)
            elif isinstance(a, ast.Starred):
                args.append(self.opaque(value))
            else:
                args.append(value)
        kwargs: dict[str, _V] = {}
        splat: list[_V] = []
        for k in node.keywords:
            value = self.ev(k.value)
            if k.arg is None:
                splat.append(value)
            else:
                kwargs[k.arg] = value
        func = node.func
        if isinstance(func, ast.Attribute):
            found, obj = self.self_chain(func)
            if not found:
                base = self.ev(func.value)
                if base.op == "const":
                    return self.function(getattr(base.value, func.attr, _MISSING), args, kwargs, splat)
                return self.method_on(base, func.attr, args, kwargs)
            callee = self.wrap(obj)
        elif isinstance(func, ast.Name) and func.id == "super":
            raise _Unsupported("it calls super()", self.saw_stream_add)
        else:
            callee = self.ev(func)
        if callee.op == "module":
            return self.module_call(callee, args, kwargs)
        if callee.op == "method":
            return self.inline(callee.value, args, kwargs)
        if callee.op == "const" and callee.value is _MISSING:
            raise _DeadPath()
        if callee.op == "const":
            return self.function(callee.value, args, kwargs, splat)
        return self.opaque(callee, *args, *kwargs.values())

    def method_on(self, base: _V, name: str, args: list[_V], kwargs: dict[str, _V]) -> _V:
        if name in _RESHAPE_METHODS and self.has_data(base):
            return self.new("pass", (base,), name="reshape")
        if name in _CAST_METHODS and self.has_data(base):
            return self.new("pass", (base,), name="cast")
        if name in _META_METHODS:
            return _V("meta")
        if name in ("add", "add_") and len(args) == 1 and not kwargs:
            v = self.new("add", (base, args[0]))
            self.adds.append(v)
            if name == "add_":  # every name bound to the tensor now holds the sum
                for key, bound in list(self.env.items()):
                    if bound is base:
                        self.env[key] = v
            return v
        return self.opaque(base, *args, *kwargs.values())

    def function(self, fn: Any, args: list[_V], kwargs: dict[str, _V], splat: list[_V]) -> _V:
        import torch
        import torch.nn.functional as F

        dropouts = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
        name = getattr(fn, "__name__", "")
        if any(fn is d for d in dropouts) and args:
            return self.new("pass", (args[0],), name="dropout")
        if fn is torch.add and len(args) == 2 and not kwargs:
            v = self.new("add", tuple(args))
            self.adds.append(v)
            return v
        if name == "dropout_add" and len(args) >= 2:  # BLOOM / Falcon: residual + dropout(x)
            dropped = self.new("pass", (args[0],), name="dropout")
            v = self.new("add", (dropped, args[1]))
            self.adds.append(v)
            return v
        if name == "apply_chunking_to_forward" and len(args) >= 3:
            known, chunk = (args[1].op == "const"), args[1].value
            if not known:
                raise _Unsupported("apply_chunking_to_forward with a chunk size spp cannot read", self.saw_stream_add)
            if chunk:
                raise SppError(
                    f"{type(self.module).__name__} runs its feed-forward in chunks of {chunk} tokens "
                    "(config.chunk_size_feed_forward): its modules run several times per forward, so hooks cannot "
                    "read one tensor per layer; set chunk_size_feed_forward=0 (the same result, computed at once)"
                )
            return self.call_value(args[0], args[3:], {})
        if isinstance(fn, type) and issubclass(fn, nn.Module):
            raise _Unsupported("it builds a module inside forward", self.saw_stream_add)
        everything = [*args, *kwargs.values(), *splat]
        if any(a.op == "self" for a in everything):
            raise _Unsupported(f"it passes the module itself to {name or 'a function'}", self.saw_stream_add)
        if any(a.op == "method" for a in everything):
            raise _Unsupported(f"it passes one of its methods to {name or 'a function'}", self.saw_stream_add)
        return self.opaque(*everything)

    def call_value(self, callee: _V, args: list[_V], kwargs: dict[str, _V]) -> _V:
        if callee.op == "module":
            return self.module_call(callee, args, kwargs)
        if callee.op == "method":
            return self.inline(callee.value, args, kwargs)
        raise _Unsupported("it calls something spp cannot follow", self.saw_stream_add)

    def module_call(self, callee: _V, args: list[_V], kwargs: dict[str, _V]) -> _V:
        module: nn.Module = callee.value
        record = _Call(callee.name, module, list(args), dict(kwargs))
        self.calls.append(record)
        result = self.new("call", (*args, *kwargs.values()), name=callee.name, value=record, stream=False)
        stream_args = [(k, v) for k, v in enumerate(args) if v.stream] + [(k, v) for k, v in kwargs.items() if v.stream]
        if not stream_args:
            return result
        if _is_norm(module) or _is_drop(module) or _LAYER_SCALE.search(type(module).__name__):
            result.stream = True  # a norm of the stream (post-norm), a dropped / scaled stream
            return result
        if _torch_native(module) or not _from_transformers(module) or self.depth >= _MAX_NESTED:
            return result
        for key, value in stream_args:
            position = _param_position(module, key)
            if position is None:
                continue
            unit = _analyse(
                module, _join(self.prefix, callee.name), position, self.depth + 1, nested=True, root=self.root
            )
            if unit is not None:
                v = self.new("unit", (result,), name=callee.name, value=unit, stream=True)
                self.units.append(v)
                self.unit_inputs[id(v)] = value
                return v
        return result

    def inline(self, method: Any, args: list[_V], kwargs: dict[str, _V]) -> _V:
        fn = _unwrap(getattr(method, "__func__", method))
        if fn.__module__.startswith("torch."):
            raise _Unsupported(f"it calls torch's {fn.__name__}", self.saw_stream_add)
        tree = _parse(fn)
        if tree is None or self.inline_depth >= _MAX_INLINE:
            raise _Unsupported(f"it calls {getattr(fn, '__name__', 'a method')}, which spp cannot read", True)
        a = tree.args
        names = [x.arg for x in (*a.posonlyargs, *a.args)]
        env: dict[str, _V] = {names[0]: _V("self")} if names else {}
        defaults: list[ast.expr | None] = [None] * (len(names) - len(a.defaults)) + list(a.defaults)
        for i, pname in enumerate(names[1:], start=1):
            default = defaults[i]
            if i - 1 < len(args):
                env[pname] = args[i - 1]
            elif pname in kwargs:
                env[pname] = kwargs[pname]
            elif default is not None:
                env[pname] = self.ev_default(default)
            else:
                raise _Unsupported(f"a call to {fn.__name__} misses {pname}", self.saw_stream_add)
        for x, kw_default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
            fallback = self.ev_default(kw_default) if kw_default is not None else self.opaque()
            env[x.arg] = kwargs.get(x.arg) or fallback
        if a.vararg is not None:
            env[a.vararg.arg] = self.new("tuple", tuple(args[len(names) - 1 :]))
        if a.kwarg is not None:
            env[a.kwarg.arg] = self.opaque()
        saved = (self.env, self.globals, self.returned)
        self.env, self.globals, self.returned = env, getattr(fn, "__globals__", {}), None
        self.inline_depth += 1
        try:
            status = self.block(tree.body)
            result = self.returned if status == "return" and self.returned is not None else self.const(None)
        finally:
            self.inline_depth -= 1
            self.env, self.globals, self.returned = saved
        if status == "raise":
            raise _Unsupported(f"{fn.__name__} always raises", self.saw_stream_add)
        return result

    def ev_default(self, node: ast.expr) -> _V:
        try:
            return self.const(ast.literal_eval(node))
        except ValueError:
            return self.const(_MISSING)


# ---- from a run to taps ------------------------------------------------------------------------------------


def _tuplish(v: _V) -> bool:
    return v.op == "tuple" or (v.op == "phi" and all(_tuplish(a) for a in v.args))


def _first(v: _V) -> _V:
    """The first tensor of a returned value (what a forward hook reads), through tuples and either-or returns."""
    if v.op == "tuple" and v.args:
        return v.args[0]
    if v.op == "phi":
        firsts = [_first(a) for a in v.args]
        if all(f is firsts[0] for f in firsts):
            return firsts[0]
        return _V("phi", tuple(firsts), stream=any(f.stream for f in firsts))
    return v


def _unclamped(v: _V) -> _V:
    """``x`` for ``x`` or ``clamp(x)`` (float16 guards: ``if x.dtype == torch.float16: x = clamp(x)``)."""
    if v.op != "phi":
        return v
    streams = [a for a in v.args if a.stream]
    others = [a for a in v.args if not a.stream]
    if len(streams) == 1 and others and all(o.op == "opaque" and streams[0] in o.args for o in others):
        return streams[0]
    return v


def _uncast(v: _V) -> _V:
    """``v`` before reshapes and dtype casts (Mamba keeps its residual in float32: ``residual.to(float32)``)."""
    while v.op == "pass" and v.name in ("reshape", "cast"):
        v = v.args[0]
    return v


def _unscaled(v: _V) -> tuple[_V, list[str]]:
    """``v`` before constant factors (MiniMax adds ``residual * alpha``), and the factors."""
    factors = []
    while (v.op == "pass" and v.name in ("reshape", "cast")) or v.op == "scale":
        if v.op == "scale":
            factors.append(v.name)
        v = v.args[0]
    return v, factors


def _unreshaped(v: _V) -> _V:
    """``v`` before views and reshapes: the same values with channels still last (OPT flattens to (B*L, C))."""
    while v.op == "pass" and v.name == "reshape":
        v = v.args[0]
    return v


class _Taps:
    """Turns a finished ``_Flow`` into taps: classify the additions, check the chain, find a site for each value."""

    def __init__(self, flow: _Flow) -> None:
        self.flow = flow
        self.uses: dict[int, int] = {}
        for v in flow.nodes:
            for a in v.args:
                self.uses[id(a)] = self.uses.get(id(a), 0) + 1
        assert flow.returned is not None
        self.returned = _first(flow.returned)
        self.uses[id(flow.returned)] = self.uses.get(id(flow.returned), 0) + 1
        self.counts: dict[str, int] = {}
        for c in flow.calls:
            self.counts[c.path] = self.counts.get(c.path, 0) + 1
        self.residual_ids: set[int] = set()

    def fail(self, reason: str) -> _Unsupported:
        return _Unsupported(reason, True)

    # graph queries
    def depends(self, a: _V, b: _V, via_call: bool = False) -> bool:
        """Whether ``a`` is computed from ``b`` (through a child call when ``via_call``)."""
        stack: list[tuple[_V, bool]] = [(a, False)]
        seen: set[tuple[int, bool]] = set()
        while stack:
            v, through = stack.pop()
            if v is b and v is not a and (through or not via_call):
                return True
            key = (id(v), through)
            if key in seen:
                continue
            seen.add(key)
            through_next = through or v.op in ("call", "unit")
            stack.extend((x, through_next) for x in v.args)
        return False

    def has_call(self, v: _V) -> bool:
        stack, seen = [v], set()
        while stack:
            x = stack.pop()
            if x.op in ("call", "unit"):
                return True
            if id(x) not in seen:
                seen.add(id(x))
                stack.extend(x.args)
        return False

    def flatten(self, add: _V, consumed: set[int]) -> list[_V]:
        terms: list[_V] = []
        for t in add.args:
            inner = t
            while inner.op == "pass" and inner.name == "dropout" and self.uses.get(id(inner), 0) == 1:
                inner = inner.args[0]
            if inner.op == "add" and self.uses.get(id(inner), 0) == 1 and id(inner) not in self.residual_ids:
                consumed.add(id(inner))
                terms.extend(self.flatten(inner, consumed))
            else:
                terms.append(t)
        return terms

    def root(self, v: _V) -> _V:
        """The stream value ``v`` is (a residual sum, a unit, the input) behind norms, drops, reshapes, tuples."""
        for _ in range(64):
            through_unit = v.op == "item" and v.index == 0 and v.args[0].op == "unit"
            through_norm = (
                v.op == "call"
                and bool(v.args)
                and v.args[0].stream
                and (_is_norm(v.value.module) or _is_drop(v.value.module))
            )
            if v.op in ("pass", "scale") or through_unit or through_norm:
                v = v.args[0]
            elif v.op == "phi":
                # either-or values: one stream behind every stream side; the other sides computed from it (fp16
                # clamps) or an optional argument that replaces it when given (DeBERTa's ``query_states``)
                streams = [a for a in v.args if a.stream]
                roots = {id(self.root(a)): self.root(a) for a in streams}
                derived = all(
                    o.op == "param" or (o.op == "opaque" and any(s in o.args for s in streams))
                    for o in v.args
                    if not o.stream
                )
                if len(roots) != 1 or not derived:
                    return v
                v = next(iter(roots.values()))
            else:
                return v
        return v

    def once(self, path: str) -> bool:
        return self.counts.get(path, 0) == 1

    def q(self, rel: str) -> str:
        return _join(self.flow.prefix, rel)

    def input_site(self) -> Site:
        v = self.flow.stream_input
        assert v is not None
        return Site(self.flow.prefix, "input", v.index if v.index >= 0 else v.name)

    def consumer_site(self, v: _V) -> Site | None:
        options: list[tuple[int, int, Site]] = []
        for c in self.flow.calls:
            if not self.once(c.path):
                continue
            norm = 0 if _is_norm(c.module) else 1
            for k, a in enumerate(c.positional):
                if _unreshaped(a) is v:
                    options.append((norm, k, Site(self.q(c.path), "input", k)))
            for key, a in c.keywords.items():
                if _unreshaped(a) is v:
                    position = _param_position(c.module, key)
                    if position is not None:
                        options.append(
                            (
                                norm,
                                position if isinstance(position, int) else 99,
                                Site(self.q(c.path), "input", position),
                            )
                        )
        return min(options, key=lambda o: o[:2])[2] if options else None

    def site(self, v: _V) -> Site | None:
        """A site holding exactly ``v``: the input, the returned value, a child's output, or a child's argument.

        Reshapes and casts are looked through: the same values (a cast up to float32, as Mamba keeps its residual,
        is exact)."""
        v = _uncast(v)
        if v is self.flow.stream_input:
            return self.input_site()
        if v is _unreshaped(_unclamped(self.returned)):
            return Site(self.flow.prefix)
        if v.op == "unit":
            return Site(self.q(v.name)) if self.once(v.name) else None
        if v.op == "call" and self.once(v.name) and not _module_returns_tuple(v.value.module):
            return Site(self.q(v.name))
        if v.op == "item" and v.index == 0 and v.args[0].op == "unit":
            return Site(self.q(v.args[0].name)) if self.once(v.args[0].name) else None
        if (
            v.op == "item"
            and v.index == 0
            and v.args[0].op == "call"
            and self.once(v.args[0].name)
            and (v.name == "unpacked" or _module_returns_tuple(v.args[0].value.module))
        ):
            return Site(self.q(v.args[0].name))
        return self.consumer_site(v)

    def branch_site(self, v: _V) -> tuple[Site | None, str, list[str], _V | None]:
        """Where the branch is read: the child that computes it, walking back past drops, identities and scales
        (so before them); also what was walked past, and the child call that computes the branch (for labels).

        A once-called identity / drop-path module on the way is kept as a fallback site, used when the walk then
        ends in code no module returns, provided no scale lies between (BEiT's shared ``drop_path`` is called
        twice, Swin's holds the window-reversed attention: an Identity at init, DropPath when training)."""
        past: list[str] = []
        fallback: tuple[Site, str, int] | None = None
        for _ in range(32):
            if v.op == "pass":
                if v.name == "dropout":
                    past.append("dropout")
                v = v.args[0]
            elif v.op == "scale":
                past.append(f"scale {v.name}")
                v = v.args[0]
            elif v.op == "item" and v.index == 0 and v.args[0].op == "call":
                call = v.args[0]
                if v.name != "unpacked" and not _module_returns_tuple(call.value.module):
                    return self.fallback(fallback, past, call)
                v = call
            elif v.op == "call" and _passthrough(v.value.module):
                module = v.value.module
                if fallback is None and self.once(v.name) and not _LAYER_SCALE.search(type(module).__name__):
                    fallback = (Site(self.q(v.name)), v.name, len(past))
                if _LAYER_SCALE.search(type(module).__name__):
                    past.append("layer scale")
                elif _is_drop(module):
                    past.append("dropout")
                if not v.args:
                    return self.fallback(fallback, past, None)
                v = v.args[0]
            elif v.op == "call":
                if not self.once(v.name):
                    return self.fallback(fallback, past, v)
                return Site(self.q(v.name)), v.name, past, v
            else:
                return self.fallback(fallback, past, self.first_call(v))
        return None, "", past, None

    def fallback(
        self, fallback: tuple[Site, str, int] | None, past: list[str], call: _V | None
    ) -> tuple[Site | None, str, list[str], _V | None]:
        """The identity / drop site kept on the way, if no scale was walked past after it; else nothing."""
        if fallback is None:
            return None, "", past, call
        site, path, walked = fallback
        if any(p.startswith("scale") or p == "layer scale" for p in past[walked:]):
            return None, "", past, call
        return site, path, past[:walked], call

    def first_call(self, v: _V) -> _V | None:
        """The child call nearest to ``v`` (breadth first) that does real work: not a norm, drop or identity."""
        queue, seen, fallback = [v], set(), None
        while queue:
            x = queue.pop(0)
            if x.op == "call":
                if not (_passthrough(x.value.module) or _is_norm(x.value.module)):
                    return x
                fallback = fallback or x
            if id(x) not in seen:
                seen.add(id(x))
                queue.extend(x.args)
        return fallback

    def rel(self, path: str) -> str:
        """A child path of the analysed module, relative to the layer being claimed (for labels and rules)."""
        qualified, root = self.q(path), self.flow.root[0]
        return qualified[len(root) + 1 :] if root and qualified.startswith(root + ".") else qualified

    def label(self, call: _V | None) -> str:
        """attn / cross_attn / mixer (state-space) / mlp, from the names on the path to the child computing it."""
        if call is None:
            return "mlp"
        if _is_norm(call.value.module) and call.args:  # sandwich norm: name the branch the norm normalises
            inner = self.branch_site(call.args[0])[3]
            if inner is not None and inner is not call:
                return self.label(inner)
        parts = self.rel(call.name).split(".")
        for pattern, label in ((_CROSS, "cross_attn"), (_ATTN, "attn"), (_MIXER, "mixer")):
            if any(pattern.search(part) for part in parts):
                return label
        return "mlp"

    # the analysis
    def taps(self) -> _Unit | None:
        flow = self.flow
        self.residual_ids = set()
        consumed: set[int] = set()
        steps: list[tuple[_V, _V, list[_V]]] = []  # (sum, shortcut, branches)
        for add in sorted(flow.adds, key=lambda a: a.seq, reverse=True):
            if id(add) in consumed:
                continue
            terms = self.flatten(add, consumed)
            if not any(t.stream for t in terms):
                continue
            shortcut = self.shortcut(terms)
            if shortcut is None:
                raise self.fail("an addition on the residual stream is not shortcut + branch")
            branches = [t for t in terms if t is not shortcut]
            if not all(self.has_call(b) for b in branches):
                raise self.fail("something is added to the residual stream that no child computes")
            steps.append((add, shortcut, branches))
            self.residual_ids.add(id(add))
        events: list[tuple[int, str, Any]] = [(a.seq, "add", (a, s, b)) for a, s, b in steps]
        events += [(u.seq, "unit", u) for u in flow.units]
        events.sort(key=lambda e: e[0])
        if not events:
            return None
        # one chain: input -> sum/unit -> ... -> returned
        previous: _V = flow.stream_input  # type: ignore[assignment]
        chain: list[tuple[str, Any, _V]] = []
        for _, kind, payload in events:
            start = payload[1] if kind == "add" else flow.unit_inputs[id(payload)]
            if self.root(start) is not previous:
                raise self.fail("its residual additions do not form one chain from input to output")
            chain.append((kind, payload, start))
            previous = payload[0] if kind == "add" else payload
        if self.root(self.returned) is not previous:
            raise self.fail("what it returns is not its residual stream")
        channels_last = self.channels_last()
        if not channels_last and not flow.nested:
            raise self.fail("its stream feeds no LayerNorm, RMSNorm or Linear, so the channel axis is unknown")
        taps: list[Tap] = []
        for i, (kind, payload, _start) in enumerate(chain):
            if kind == "unit":
                taps.extend(payload.value.taps)
                continue
            add, shortcut, branches = payload
            following = chain[i + 1][2] if i + 1 < len(chain) else self.returned
            taps.append(self.tap(add, shortcut, branches, following))
        return _Unit(taps=taps, channels_last=channels_last)

    def shortcut(self, terms: list[_V]) -> _V | None:
        if self.flow.nested:
            streams = [t for t in terms if t.stream]
            if len(streams) == 1 and not any(self.depends(streams[0], o) for o in terms if o is not streams[0]):
                return streams[0]
        options = [
            t
            for t in terms
            if t.stream
            and all(self.depends(o, _unscaled(t)[0], via_call=True) for o in terms if o is not t)
            and not any(self.depends(t, o) for o in terms if o is not t)
        ]
        return options[0] if len(options) == 1 else None

    def channels_last(self) -> bool:
        """Tokens (B, L, C): the stream feeds a norm or a Linear, or (no convolution anywhere in the layer) a
        child whose own children include a Linear (OLMo2 feeds the stream straight into attention)."""
        flow = self.flow
        if any(u.value.channels_last for u in flow.units):
            return True
        convolutions = any(
            isinstance(m, (nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)) for m in flow.module.modules()
        )
        for c in flow.calls:
            first = c.positional[0] if c.positional else next(iter(c.keywords.values()), None)
            if first is None or not first.stream:
                continue
            if _is_norm(c.module) or _is_linear(c.module):
                return True
            if not convolutions and any(_is_linear(child) for child in c.module.children()):
                return True
        return False

    def post_norm(self, add: _V, following: _V) -> _V | None:
        """The norm call between ``add`` and the next stream value, when the stream continues after a norm."""
        v = _unclamped(following)
        for _ in range(64):
            if v is add:
                return None
            if v.op == "call" and v.args and _is_norm(v.value.module) and self.root(v.args[0]) is add:
                return v
            if v.op in ("pass", "call", "item") and v.args:
                v = v.args[0]
            else:
                return None
        return None

    def tap(self, add: _V, shortcut: _V, branches: list[_V], following: _V) -> Tap:
        flow = self.flow
        output = self.site(add)
        if output is None:
            raise self.fail("a residual sum is held by no module input or output (no hook can read it)")
        unscaled, shortcut_factors = _unscaled(shortcut)
        short = self.site(unscaled)
        if short is None:
            raise self.fail("the value a branch is added to is held by no module input or output")
        norm = self.post_norm(add, following)
        stream = ""
        if norm is not None:
            stream = f"{type(norm.value.module).__name__} input (post-norm: the sum before the norm)"
        notes: list[str] = []
        layer_class = self.flow.root[1]
        if len(branches) > 1:
            found = {self.label(self.branch_site(b)[3]) for b in branches}
            labels = [x for x in ("attn", "cross_attn", "mlp") if x in found]
            scaled = any(p.startswith("scale") for b in branches for p in self.branch_site(b)[2])
            branch = "+".join(labels)
            rule = f"transformers {layer_class}: parallel residual, branch = output - input ({' + '.join(labels)})"
            notes.append("parallel residual: the branches are read together as output - input (their sum as added)")
            if scaled:
                notes.append("the branches are scaled before the add; res_avg_var is after that scale")
            residual: Site | Difference = Difference(output, short)
        else:
            site, path, past, call = self.branch_site(branches[0])
            branch = self.label(call)
            scales = [p[len("scale ") :] for p in past if p.startswith("scale ")]
            if site is None:
                if scales or "layer scale" in past:
                    raise self.fail("a scaled branch is computed by no single module (cannot read it before the scale)")
                residual = Difference(output, short)
                rule = f"transformers {layer_class}: {branch} branch = output - shortcut"
                notes.append("no module returns the branch alone: it is read as output - shortcut (as added)")
            else:
                residual = site
                module = flow.module.get_submodule(path)
                qualifiers = []
                if module is not None and _is_norm(module):
                    qualifiers.append("the norm on the branch, as added")
                    notes.append(
                        f"sandwich norm: the branch is read at {self.rel(path)}, the norm applied to the {branch} "
                        "output before the add (the branch as added)"
                    )
                elif norm is not None:
                    qualifiers.append("post-norm")
                elif self.pre_norm(branches[0]):
                    qualifiers.append("pre-norm")
                walked = [p if not p.startswith("scale ") else "the scale" for p in dict.fromkeys(past)]
                if walked:
                    qualifiers.append("before " + ", ".join(dict.fromkeys(walked)))
                rule = f"transformers {layer_class}: {branch} branch = {self.rel(path)}"
                rule += f" ({'; '.join(qualifiers)})" if qualifiers else ""
                for factor in scales:
                    notes.append(f"the branch is multiplied by {factor} before the add; res_avg_var is before that")
                if "layer scale" in past:
                    notes.append("res_avg_var is read before the layer scale")
        for factor in shortcut_factors:
            notes.append(f"the shortcut is multiplied by {factor} before the add (output = {factor} * shortcut + ...)")
        used = {output.module, short.module}
        used.update({residual.module} if isinstance(residual, Site) else set())
        for first, end, holds, conditional in flow.assumed:
            if any(n is add for n in flow.nodes[first:end]) or used & conditional:
                notes.append(
                    f"read where `{holds}` (spp assumes it holds, as an encoder-decoder model passes it); "
                    "without it these sites do not run"
                )
        if output == Site(flow.prefix) and _unclamped(self.returned) is not self.returned:
            notes.append("float16 only: the layer clamps its output near the float16 maximum")
        return Tap(
            name=f"{flow.prefix}.{branch}" if flow.prefix else branch,
            module=flow.prefix,
            stage=-1,
            output=output,
            residual=residual,
            rule=rule,
            channel_dim=-1,
            note="; ".join(notes),
            shortcut=short,
            branch=branch,
            stream=stream,
        )

    def pre_norm(self, branch: _V) -> bool:
        call = self.branch_site(branch)[3]
        if call is None or not call.args:
            return False
        first = call.args[0]
        return first.op == "call" and _is_norm(first.value.module)


def _analyse(
    module: nn.Module,
    prefix: str,
    stream_param: int | str,
    depth: int,
    nested: bool,
    root: tuple[str, str] | None = None,
) -> _Unit | None:
    """Taps of ``module`` as a residual unit whose stream enters at ``stream_param``; None if it is not one."""
    if _torch_native(module) or not _from_transformers(module):
        return None
    flow = _Flow(module, prefix, stream_param, depth, nested, root or (prefix, type(module).__name__))
    try:
        flow.run()
        return _Taps(flow).taps()
    except _Unsupported:
        if nested or depth:
            return None
        raise
    except SppError:
        raise
    except Exception as exc:  # code the interpreter does not expect: not provably residual, never a crash
        if nested or depth:
            return None
        raise _Unsupported(f"spp could not follow its forward ({type(exc).__name__})") from None


def _with_unique_names(taps: list[Tap], layer: str) -> list[Tap]:
    from dataclasses import replace

    counts: dict[str, int] = {}
    for t in taps:
        counts[t.branch] = counts.get(t.branch, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for t in taps:
        seen[t.branch] = seen.get(t.branch, 0) + 1
        suffix = t.branch if counts[t.branch] == 1 else f"{t.branch}{seen[t.branch]}"
        out.append(replace(t, name=f"{layer}.{suffix}" if layer else suffix, module=layer))
    return out


# ---- the rules ---------------------------------------------------------------------------------------------


def albert_shared(name: str, module: nn.Module) -> list[Tap] | None:
    """ALBERT runs one set of layer weights at every depth: hooks would merge all depths into one point."""
    groups = getattr(module, "albert_layer_groups", None)
    if not isinstance(groups, nn.ModuleList) or not _from_transformers(module):
        return None
    depth = getattr(getattr(module, "config", None), "num_hidden_layers", "several")
    raise SppError(
        f"{name or type(module).__name__}: ALBERT shares its layer weights across depth ({len(groups)} layer "
        f"group(s) run {depth} times per forward), so a hook on a layer fires at every depth and would merge them "
        "into one SPP point; spp cannot measure ALBERT per depth"
    )


def sublayer_block(name: str, module: nn.Module) -> list[Tap] | None:
    """T5-style blocks (T5, mT5, LongT5, UMT5, Switch): a ModuleList ``layer`` of residual sub-layers.

    Each sub-layer (T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF) adds one branch to its own input,
    so each gives one tap read inside it; the block itself only passes the stream on (and clamps it in fp16).
    The cross-attention sub-layer runs only when encoder states are passed (always, inside T5Model).
    """
    layers = getattr(module, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2 or not _from_transformers(module):
        return None
    if len({type(m) for m in layers}) != len(layers):
        return None  # an encoder of identical layers, not a block of sub-layers
    taps: list[Tap] = []
    for i, sub in enumerate(layers):
        prefix = _join(name, f"layer.{i}")
        try:
            unit = _analyse(sub, prefix, 0, 0, nested=False, root=(name, type(module).__name__))
        except _Unsupported:
            return None
        if unit is None or len(unit.taps) != 1:
            return None
        taps.extend(unit.taps)
    return _with_unique_names(taps, name)


def transformers_layer(name: str, module: nn.Module) -> list[Tap] | None:
    """Any transformers module whose own forward provably adds branches to its input (see the module docstring)."""
    if _torch_native(module) or not _from_transformers(module):
        return None
    try:
        unit = _analyse(module, name, 0, 0, nested=False)
    except _Unsupported as exc:
        if exc.residual and _is_layer_class(module):
            raise SppError(
                f"{name} ({type(module).__name__}): spp cannot read this transformers layer's residual stream: "
                f"{exc}; measure whole layers with --blocks '{_pattern(name)}' (output - input)"
            ) from None
        return None
    if unit is None or not unit.taps:
        return None
    return _with_unique_names(unit.taps, name)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+$", ".*", name) if re.search(r"\.\d+$", name) else name


TRANSFORMER_RULES: tuple[tuple[str, Callable[[str, nn.Module], list[Tap] | None]], ...] = (
    ("transformers albert (refused)", albert_shared),
    ("transformers sub-layer block (T5)", sublayer_block),
    ("transformers layer", transformers_layer),
)

"""An oracle for residual additions that shares nothing with spp: what a model really adds, and on which axis
its channels lie. It is the ground truth of the zoo tests, so it imports torch and the standard library only.

``residual_adds(model, *args, **kwargs)`` runs one forward under ``torch.no_grad()`` and a ``TorchDispatchMode``
that sees every aten op after autograd's decompositions (``F.linear`` arrives as ``view, t, addmm, view``),
with forward pre/post hooks on every module keeping the stack of running modules. It returns one ``AddEvent`` per
addition of two *activations* of the *same shape* (``add.Tensor``, ``add_.Tensor``, and ``addcmul`` read as
``input + t1 * t2``; a subtraction is no event: poolformer's ``pool(x) - x`` lies inside a branch). An
activation is a value computed from the model's inputs: parameters, buffers, constants, factory outputs
(``arange``, ``zeros``) and everything computed from them alone are not, so adding a position embedding, a
relative position bias or an attention mask is never an event. ``trace(model, args, watch=[...])`` returns the
events and the first input of each watched module (the SPP's stem point) with its proven channel axis.

What the oracle tracks per activation (a weak-keyed table, so nothing outlives its tensor):
- ``anc``: the set of earlier values it was computed from (a bitmask of value ids; an in-place op makes a new
  value). An event is ``identity`` when one operand (after stripping scales and reshapes) is an ancestor of the
  other: ``x + f(x)``; that operand is the shortcut. Otherwise it is ``parallel`` (a projection shortcut
  ``proj(x) + f(x)``, or a merge of branches such as HRNet's fusion); the operand with fewer values of its own
  is guessed as the shortcut.
- ``source``: when it is a *scale* (``mul``/``div`` of one activation by a non-activation: layer scale, gamma,
  alpha, skip gain, a constant) or a *layout* op (view, reshape, permute, transpose, clone) of one activation.
  Walking back through these from the branch operand gives the branch *before its scale*; its producing
  module, where one returned it, is reported too.
- ``layout``: where the channels are, proved from the layers that produced the value, never from the rank:
  a convolution puts them on axis 1 (count = its output channels); a matmul with a weight (``addmm``/``mm``/
  ``bmm`` with one non-activation operand, i.e. ``nn.Linear``) on the last axis, unless the activation's channels
  sit on another axis, in which case the product mixes a non-channel axis (MLP-Mixer's token MLP) and they stay;
  an embedding lookup on the last axis; norms and elementwise ops keep what their input had, and an untagged
  input takes the norm's own axis (batch/group norm: 1, layer norm over one axis: last); permute/transpose/
  squeeze/select/slice/cat/reductions move or keep it; a view/reshape keeps it while the channel digit of the
  row-major flat index stays inside one axis (a merged ``(B*C, N)`` axis is remembered and restored by the
  inverse view), and drops it when the channels are split across axes (heads) or mixed away. Two operands
  that disagree leave the result unknown. ``AddEvent.channel_axis`` is the agreed axis of the two operands
  (one known one unknown counts as known), ``None`` when unknown or in conflict.

The caller chooses train or eval mode; the oracle changes nothing on the model and removes its hooks on exit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# ---- what one op does to the channel axis ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the channels are: along ``axis``, index = outer * (channels * inner) + c * inner + rest.

    ``inner == 1`` and ``shape[axis] == channels`` is a plain channel axis; otherwise the channels are one
    digit of a merged axis (``(B*C, N)`` inside a token MLP), kept so that the inverse view restores them.
    """

    axis: int
    inner: int
    channels: int

    def plain(self, shape: torch.Size) -> bool:
        return self.inner == 1 and 0 <= self.axis < len(shape) and shape[self.axis] == self.channels


def _prod(xs: Any) -> int:
    return math.prod(int(x) for x in xs)


def _reshaped(lay: Layout | None, old: torch.Size, new: torch.Size) -> Layout | None:
    """The layout after a row-major view: the channel digit has flat stride ``fs`` and period ``fs * C``; it
    survives when one axis of the new shape holds that whole digit."""
    if lay is None or not 0 <= lay.axis < len(old) or old[lay.axis] % (lay.inner * lay.channels):
        return None
    fs = lay.inner * _prod(old[lay.axis + 1 :])
    span = fs * lay.channels
    suffix = 1
    for j in reversed(range(len(new))):
        if suffix > fs:
            return None
        full = suffix * int(new[j])
        if fs % suffix == 0 and full % span == 0:
            return Layout(j, fs // suffix, lay.channels)
        suffix = full
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _moved(lay: Layout | None, new_axis: int | None) -> Layout | None:
    return None if lay is None or new_axis is None else Layout(new_axis, lay.inner, lay.channels)


_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy", "unflatten", "flatten", "alias"}
_LAYOUT_SOURCES = _VIEWS | {"permute", "transpose", "t", "clone", "contiguous", "_to_copy", "detach", "expand"}
_CONVS = re.compile(r"convolution|^_?conv|conv_depthwise|mkldnn_conv|thnn_conv")
# The two multiplied operands of each matmul-like op, by schema name (``linear``'s weight is W^T: same side).
_MATMUL_OPERANDS = {
    "mm": ("self", "mat2"),
    "bmm": ("self", "mat2"),
    "matmul": ("self", "other"),
    "addmm": ("mat1", "mat2"),
    "_addmm_activation": ("mat1", "mat2"),
    "baddbmm": ("batch1", "batch2"),
    "linear": ("input", "weight"),
}
_MATMULS = set(_MATMUL_OPERANDS)
_NORMS = {
    "native_layer_norm": "last",
    "layer_norm": "last",
    "rms_norm": "last",
    "_fused_rms_norm": "last",
    "native_batch_norm": "one",
    "_native_batch_norm_legit": "one",
    "_native_batch_norm_legit_no_training": "one",
    "_batch_norm_with_update": "one",
    "_batch_norm_no_update": "one",
    "batch_norm": "one",
    "native_group_norm": "one",
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "var_mean", "std_mean", "max", "min", "logsumexp", "norm",
               "linalg_vector_norm"}
# Ops that keep the channel axis where its extent is unchanged although the other axes change size.
_AXIS_KEEPING = re.compile(r"pool|upsample|pad|roll|flip|interp|grid_sampler|fractional")
_SCALES = {"mul", "mul_", "div", "div_"}


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name (defaults filled in)."""
    bound: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


# ---- the per-activation table and the events ---------------------------------------------------------------


@dataclass
class _Info:
    vid: int
    anc: int  # bitmask of value ids this value was computed from, its own included
    depth: int  # learned layers on the longest path from the inputs (ops reading a parameter)
    layout: Layout | None
    source: tuple[str, torch.Tensor] | None = None  # ("scale" | "layout", the activation it was made from)
    returned_by: list[str] = field(default_factory=list)  # modules that returned this tensor, innermost first
    event: int = -1  # the add event whose result this is (or a unary op of it)
    post_depth: int = 0


@dataclass
class AddTensors:
    """Clones taken while the forward ran (``keep_tensors=True``)."""

    lhs: torch.Tensor
    rhs: torch.Tensor
    out: torch.Tensor
    branch: torch.Tensor  # the non-shortcut operand before any scale (and before the reshapes after it)
    post: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # the sum after unary ops (act), in order


@dataclass
class AddEvent:
    """One addition of two same-shape activations, in forward order."""

    index: int
    op: str  # "add", "add_", "addcmul", "addcmul_"
    module: str  # innermost running module ("" = the model itself)
    stack: tuple[str, ...]  # running modules, outermost first
    shape: tuple[int, ...]
    # "identity": the shortcut is an ancestor of the branch; "parallel": neither is (shortcut guessed);
    # "weightless": an identity add with no learned layer between them (rope: x * cos + rotate(x) * sin)
    kind: str
    shortcut: int  # which operand (0 = lhs, 1 = rhs) is the shortcut
    shortcut_scaled: bool  # the shortcut passed a scale (caformer's res_scale) since its ancestor value
    branch_scaled: bool  # the branch operand is a scaled value: read ``branch`` to get it before its scale
    operand_axes: tuple[int | None, int | None]  # plain channel axis of lhs, rhs (None = unknown)
    channel_axis: int | None  # the agreed channel axis of the sum, None if unknown or in conflict
    channels: int | None
    conflict: bool  # the operands' channel axes disagree
    branch_axis: int | None  # channel axis of the pre-scale branch tensor (its own layout)
    branch_shape: tuple[int, ...]
    branch_modules: tuple[str, ...]  # modules that returned the pre-scale branch (or a reshape of it), innermost first
    shortcut_modules: tuple[str, ...]  # modules that returned the shortcut, innermost first
    alpha: float = 1.0  # add's alpha (x + alpha * y)
    tensors: AddTensors | None = None

    @property
    def branch(self) -> int:
        return 1 - self.shortcut

    @property
    def branch_module(self) -> str:
        """The innermost module that returned the pre-scale branch, "" if none did (a functional branch)."""
        return self.branch_modules[0] if self.branch_modules else ""

    @property
    def shortcut_module(self) -> str:
        return self.shortcut_modules[0] if self.shortcut_modules else ""


@dataclass
class WatchedInput:
    """The first tensor a watched module received (first call): its proven channel axis, and a clone on request."""

    channel_axis: int | None
    shape: tuple[int, ...]
    tensor: torch.Tensor | None


@dataclass
class Trace:
    events: list[AddEvent]
    inputs: dict[str, WatchedInput]  # by module name, for the modules named in ``watch``


class _ModuleStack:
    """Forward pre/post hooks on every module: the stack of running modules, and which module returned what."""

    def __init__(self, model: nn.Module, oracle: _Oracle, watch: frozenset[str]) -> None:
        self.names: list[str] = []
        self.oracle = oracle
        self.watch = watch
        self.inputs: dict[str, WatchedInput] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def _pre(self, name: str):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.names.append(name)
            if name in self.watch and name not in self.inputs:
                x = next(_tensors((args, kwargs)), None)
                if x is not None:
                    keep = x.detach().clone() if self.oracle.keep else None
                    self.inputs[name] = WatchedInput(self.oracle.plain_axis(x), tuple(x.shape), keep)

        return pre

    def _post(self, name: str):
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if self.names and self.names[-1] == name:
                self.names.pop()
            for t in _tensors(output):
                info = self.oracle.info.get(t)
                if info is not None:
                    info.returned_by.append(name)

        return post

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return (x for x in leaves if isinstance(x, torch.Tensor))


class _Oracle(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Otherwise torch wraps ``__torch_dispatch__`` in ``dynamo.disable``, whose first call imports
        torch._dynamo (5-10 s on a busy 2-core machine); the oracle never runs under torch.compile."""
        return False

    def __init__(self, keep_tensors: bool) -> None:
        super().__init__()
        self.info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.weights: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameters and values made from them alone
        self.keep = keep_tensors
        self.events: list[AddEvent] = []
        self.stack: _ModuleStack | None = None
        self.next_vid = 0

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def new_info(
        self, anc: int, layout: Layout | None, source: tuple[str, torch.Tensor] | None = None, depth: int = 0
    ) -> _Info:
        vid = self.next_vid
        self.next_vid += 1
        return _Info(vid=vid, anc=anc | (1 << vid), depth=depth, layout=layout, source=source)

    def mark_input(self, t: torch.Tensor) -> None:
        if t not in self.info:
            self.info[t] = self.new_info(0, None)

    def layout(self, t: Any) -> Layout | None:
        info = self.info.get(t) if isinstance(t, torch.Tensor) else None
        return info.layout if info is not None else None

    def is_act(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.info

    def plain_axis(self, t: torch.Tensor) -> int | None:
        lay = self.layout(t)
        return lay.axis if lay is not None and lay.plain(t.shape) else None

    def strip(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Walk back through scales and layout ops: (the value before the first scale, the root, scaled?)."""
        pre, node, scaled = t, t, False
        for _ in range(64):
            info = self.info.get(node)
            if info is None or info.source is None:
                break
            kind, node = info.source
            if kind == "scale":
                pre, scaled = node, True
        return pre, node, scaled

    def producers(self, t: torch.Tensor) -> tuple[str, ...]:
        """The modules that returned ``t`` (innermost first), or the tensor ``t`` is a reshape/permute of."""
        for _ in range(64):
            info = self.info.get(t)
            if info is None:
                return ()
            if info.returned_by:
                return tuple(info.returned_by)
            if info.source is None or info.source[0] != "layout":
                return ()
            t = info.source[1]
        return ()

    # ---- dispatch ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = list(_tensors((args, kwargs)))
        acts = [t for t in inputs if t in self.info]
        if not acts:
            out = func(*args, **kwargs)
            if any(t in self.weights for t in inputs):  # a view or product of parameters only
                for t in _tensors(out):
                    self.weights[t] = True
            return out
        name = func.overloadpacket.__name__
        schema = func._schema
        mutated = [
            args[i]
            for i, a in enumerate(schema.arguments)
            if i < len(args)
            and a.alias_info is not None
            and a.alias_info.is_write
            and isinstance(args[i], torch.Tensor)
        ]
        before = self.info.get(acts[0]) if len(acts) == 1 else None  # an in-place op replaces it
        event = self.event_before(name, func, args, kwargs)
        source = self.source_before(name, func, args, kwargs, mutated)
        out = func(*args, **kwargs)
        outs = list(_tensors(out))
        anc = 0
        for t in acts:
            anc |= self.info[t].anc
        depth = max(self.info[t].depth for t in acts) + any(t in self.weights for t in inputs)
        layouts = self.out_layouts(name, func, args, kwargs, outs)
        for t, lay in zip(outs, layouts, strict=True):
            self.info[t] = self.new_info(anc, lay, source if len(outs) == 1 else None, depth)
            base = t._base
            if any(t is m for m in mutated) and isinstance(base, torch.Tensor):  # a write into a view: its base
                old = self.info.get(base)
                old_anc, old_depth = (old.anc, old.depth) if old else (0, 0)
                self.info[base] = self.new_info(
                    anc | old_anc, old.layout if old else None, None, max(depth, old_depth)
                )
        if event is not None:
            self.event_after(event, outs[0])
        elif len(outs) == 1 and len(inputs) == 1 and before is not None:
            self.maybe_post(before, acts[0], outs[0], name)
        return out

    def source_before(self, name: str, func: Any, args: tuple, kwargs: dict, mutated: list) -> tuple | None:
        """A scale (one activation times a non-activation) or a layout op of one activation: remember its input."""
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        acts = [a for a in tensors if self.is_act(a)]
        if name in _SCALES and len(acts) == 1 and len(args) >= 2:
            x = acts[0]
            if name.startswith("div") and x is not args[0]:
                return None  # c / x is no scale of x
            if any(x is m for m in mutated):  # x.mul_(gamma): keep the value before, with its history
                before = x.clone()
                self.info[before] = self.info[x]
                return ("scale", before)
            return ("scale", x)
        if name in _LAYOUT_SOURCES and len(acts) == 1 and acts[0] is args[0] and not mutated:
            return ("layout", args[0])
        return None

    def maybe_post(self, info: _Info, x: torch.Tensor, out: torch.Tensor, name: str) -> None:
        """The sum after a unary elementwise op (the block's activation): kept so a tap read there matches."""
        if info.event < 0 or out.shape != x.shape or name in _LAYOUT_SOURCES or name in _VIEWS or name in _REDUCTIONS:
            return
        if info.post_depth >= 2 or name in {"add", "add_", "mul", "mul_", "div", "div_", "sub", "sub_"}:
            return
        new = self.info[out]
        new.event, new.post_depth = info.event, info.post_depth + 1
        tensors = self.events[info.event].tensors
        if tensors is not None:
            tensors.post.append((name, out.detach().clone()))

    # ---- events --------------------------------------------------------------------------------------------
    def event_before(self, name: str, func: Any, args: tuple, kwargs: dict) -> dict | None:
        if name in ("add", "add_") and len(args) >= 2:
            a, b = args[0], args[1]
            alpha = float(kwargs.get("alpha", 1))
            branch_value = None
        elif name in ("addcmul", "addcmul_") and len(args) >= 3:
            a, t1, t2 = args[0], args[1], args[2]
            alpha = float(kwargs.get("value", 1))
            if not (isinstance(t1, torch.Tensor) and isinstance(t2, torch.Tensor)):
                return None
            factors = [t for t in (t1, t2) if self.is_act(t)]
            if len(factors) != 1 or torch.broadcast_shapes(t1.shape, t2.shape) != getattr(a, "shape", None):
                return None
            b = factors[0]  # the branch before its scale: t1 * t2 * value with one non-activation factor
            branch_value = (t1 * t2 * alpha) if self.keep else None
        else:
            return None
        if not (self.is_act(a) and self.is_act(b)) or a.shape != b.shape or not a.is_floating_point():
            return None
        ia, ib = self.info[a], self.info[b]
        roots = [self.strip(a), self.strip(b)]
        root_info = [self.info.get(r[1]) for r in roots]
        vid = [ia.vid, ib.vid]
        rvid = [ri.vid if ri else v for ri, v in zip(root_info, vid, strict=True)]
        ancs = [ia.anc, ib.anc]
        kind, shortcut = "parallel", -1
        for s in (0, 1):
            other = ancs[1 - s]
            if (other >> vid[s]) & 1 or (other >> rvid[s]) & 1:
                kind, shortcut = "identity", s
                break
        if kind == "identity":
            root = root_info[shortcut] or (ia, ib)[shortcut]
            if (ia, ib)[1 - shortcut].depth <= root.depth:
                kind = "weightless"  # no learned layer between shortcut and branch: rope's x*cos + rot(x)*sin
        if shortcut < 0:
            own = [(ancs[0] & ~ancs[1]).bit_count(), (ancs[1] & ~ancs[0]).bit_count()]
            shortcut = 0 if own[0] <= own[1] else 1
        br = (a, b)[1 - shortcut]
        pre, _, branch_scaled = self.strip(br)
        if name.startswith("addcmul"):
            branch_scaled = True
        axes = (self.plain_axis(a), self.plain_axis(b))
        known = {x for x in axes if x is not None}
        axis = known.pop() if len(known) == 1 else None
        pre_info = self.info.get(pre)
        stack = tuple(self.stack.names) if self.stack else ()
        ev = AddEvent(
            index=len(self.events),
            op=name,
            module=stack[-1] if stack else "",
            stack=stack,
            shape=tuple(a.shape),
            kind=kind,
            shortcut=shortcut,
            shortcut_scaled=roots[shortcut][2],
            branch_scaled=branch_scaled,
            operand_axes=axes,
            channel_axis=axis,
            channels=int(a.shape[axis]) if axis is not None else None,
            conflict=len({x for x in axes if x is not None}) > 1,
            branch_axis=self.plain_axis(pre) if pre_info else None,
            branch_shape=tuple(pre.shape),
            branch_modules=self.producers(pre),
            shortcut_modules=self.producers((a, b)[shortcut]),
            alpha=alpha,
        )
        if self.keep:
            rhs = branch_value if branch_value is not None else b
            ev.tensors = AddTensors(
                lhs=a.detach().clone(), rhs=rhs.detach().clone(), out=a, branch=pre.detach().clone()
            )
        return {"event": ev}

    def event_after(self, pending: dict, out: torch.Tensor) -> None:
        ev: AddEvent = pending["event"]
        if ev.tensors is not None:
            ev.tensors.out = out.detach().clone()
        info = self.info[out]
        info.event = ev.index
        if ev.channel_axis is not None:
            info.layout = Layout(ev.channel_axis, 1, int(out.shape[ev.channel_axis]))
        self.events.append(ev)

    # ---- layouts -------------------------------------------------------------------------------------------
    def out_layouts(self, name: str, func: Any, args: tuple, kwargs: dict, outs: list) -> list[Layout | None]:
        try:
            return self._out_layouts(name, func, args, kwargs, outs)
        except Exception:  # an op this oracle does not model loses the layout, never the forward
            return [None] * len(outs)

    def _out_layouts(self, name: str, func: Any, args: tuple, kwargs: dict, outs: list) -> list[Layout | None]:
        n = len(outs)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        lay = self.layout(x)
        p = _bind(func, args, kwargs)
        if _CONVS.search(name) and outs and outs[0].ndim >= 3 and "weight" in p:
            return [Layout(1, 1, int(outs[0].shape[1]))] + [None] * (n - 1)
        if name in _MATMULS:
            return [self.matmul_layout(name, p, outs[0])] + [None] * (n - 1)
        if name == "embedding":
            return [Layout(outs[0].ndim - 1, 1, int(outs[0].shape[-1]))]
        if name in _NORMS:
            inp = p.get("input", x)
            own = self.layout(inp)
            if own is None:
                own = Layout(outs[0].ndim - 1, 1, int(outs[0].shape[-1])) if _NORMS[name] == "last" else (
                    Layout(1, 1, int(outs[0].shape[1])) if outs[0].ndim >= 2 else None
                )
                if name in ("native_layer_norm", "layer_norm") and len(p.get("normalized_shape", [])) != 1:
                    own = None
            return [own] + [None] * (n - 1)
        if x is not None and (name in _VIEWS or name in _REDUCTIONS or name in {
            "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "select", "slice", "unbind", "split",
            "split_with_sizes", "chunk", "movedim", "narrow",
        }):
            return self.shape_layouts(name, p, x, lay, outs)
        if name in ("cat", "stack"):
            return [self.cat_layout(name, p, outs[0])]
        return [self.elementwise_layout(name, args, kwargs, o) for o in outs]

    def matmul_layout(self, name: str, p: dict, out: torch.Tensor) -> Layout | None:
        """``x @ W`` contracts x's last axis: the new channels are the output's last axis, unless x's channels sit
        on another axis (a token MLP mixes positions, not channels). ``W @ x`` likewise with axis -2."""
        a, b = (p.get(k) for k in _MATMUL_OPERANDS[name])
        act_a, act_b = self.is_act(a), self.is_act(b)
        if act_a == act_b:
            return None  # two activations (attention scores, attention @ values), or no activation
        x, contracted, kept = (a, -1, -1) if act_a else (b, -2, -2)
        lay = self.layout(x)
        if lay is not None and lay.axis != x.ndim + contracted:
            return _moved(lay, lay.axis + out.ndim - x.ndim)
        return Layout(out.ndim + kept, 1, int(out.shape[kept]))

    def shape_layouts(self, name: str, p: dict, x: torch.Tensor, lay: Layout | None, outs: list) -> list:
        n, nd = len(outs), x.ndim
        if lay is None:
            return [None] * n
        a = lay.axis
        if name in _VIEWS:
            return [_reshaped(lay, x.shape, o.shape) for o in outs]
        if name == "expand":  # new leading axes; an expanded channel axis is no channel axis
            new = a + outs[0].ndim - nd
            return [_moved(lay, new) if outs[0].shape[new] == x.shape[a] else None]
        if name == "permute":
            dims = [_norm_dim(d, nd) for d in p["dims"]]
            return [_moved(lay, dims.index(a))]
        if name == "movedim":
            return [None]
        if name == "transpose":
            d0, d1 = _norm_dim(p["dim0"], nd), _norm_dim(p["dim1"], nd)
            return [_moved(lay, d1 if a == d0 else d0 if a == d1 else a)]
        if name == "t":
            return [_moved(lay, (nd - 1 - a) if nd == 2 else a)]
        if name == "unsqueeze":
            d = _norm_dim(p["dim"], nd + 1)
            return [_moved(lay, a + 1 if d <= a else a)]
        if name == "squeeze":
            dims = p.get("dim")
            if dims is None:
                dims = [i for i in range(nd) if x.shape[i] == 1]
            elif isinstance(dims, int):
                dims = [dims]
            gone = {_norm_dim(d, nd) for d in dims if x.shape[_norm_dim(d, nd)] == 1}
            return [None if a in gone else _moved(lay, a - sum(1 for d in gone if d < a))]
        if name in ("select", "unbind"):
            d = _norm_dim(p["dim"], nd)
            return [None if d == a else _moved(lay, a - (1 if d < a else 0))] * n
        if name in ("slice", "narrow", "split", "split_with_sizes", "chunk"):
            d = _norm_dim(p.get("dim", 0), nd)
            if d != a:
                return [lay] * n
            if not lay.plain(x.shape) or int(p.get("step", 1) or 1) != 1:
                return [None] * n
            return [Layout(a, 1, int(o.shape[a])) for o in outs]
        if name in _REDUCTIONS:
            dims = p.get("dim")
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                return [None] * n
            dims = [dims] if isinstance(dims, int) else list(dims)
            gone = {_norm_dim(d, nd) for d in dims}
            if a in gone:
                return [None] * n
            keep = bool(p.get("keepdim", False))
            return [lay if keep else _moved(lay, a - sum(1 for d in gone if d < a))] * n
        return [None] * n

    def cat_layout(self, name: str, p: dict, out: torch.Tensor) -> Layout | None:
        tensors = [t for t in p.get("tensors", []) if self.is_act(t)]
        lays = [self.layout(t) for t in tensors]
        if not lays or any(lay is None for lay in lays) or len({(lay.axis, lay.inner) for lay in lays}) != 1:
            return None
        lay, nd = lays[0], tensors[0].ndim
        d = _norm_dim(p.get("dim", 0), nd + (1 if name == "stack" else 0))
        if name == "stack":
            if len({x.channels for x in lays}) != 1:
                return None
            return _moved(lay, lay.axis + 1 if d <= lay.axis else lay.axis)
        if d == lay.axis:
            ok = all(x.plain(t.shape) for x, t in zip(lays, tensors, strict=True))
            return Layout(d, 1, int(out.shape[d])) if ok else None
        return lay if len({x.channels for x in lays}) == 1 else None

    def elementwise_layout(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> Layout | None:
        acts = [t for t in _tensors((args, kwargs)) if self.is_act(t)]
        full = {self.layout(t) for t in acts if t.shape == out.shape} - {None}
        if any(t.shape == out.shape for t in acts):
            axes = {(lay.axis, lay.inner, lay.channels) for lay in full}
            return full.pop() if len(axes) == 1 else None
        if len(acts) == 1 and _AXIS_KEEPING.search(name):
            x, lay = acts[0], self.layout(acts[0])
            same_extent = lay is not None and x.ndim == out.ndim and out.shape[lay.axis] == x.shape[lay.axis]
            if same_extent and lay.plain(x.shape):
                return lay
        return None


def trace(
    model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, keep_tensors: bool = False,
    watch: Iterable[str] = (),
) -> Trace:
    """Run ``model(*args, **kwargs)`` once (no_grad): every addition of two same-shape activations, and the first
    input of each module named in ``watch`` (an SPP's stem point is the first block's input) with its proven
    channel axis. ``keep_tensors=True`` keeps clones (``AddEvent.tensors``, ``WatchedInput.tensor``).
    Every tensor in ``args``/``kwargs`` is an input."""
    kwargs = kwargs or {}
    oracle = _Oracle(keep_tensors)
    for t in _tensors((args, kwargs)):
        oracle.mark_input(t)
    for p in model.parameters():
        oracle.weights[p] = True
    oracle.stack = _ModuleStack(model, oracle, frozenset(watch))
    try:
        with torch.no_grad(), oracle:
            model(*args, **kwargs)
    finally:
        oracle.stack.remove()
    return Trace(oracle.events, oracle.stack.inputs)


def residual_adds(model: nn.Module, *args: Any, keep_tensors: bool = False, **kwargs: Any) -> list[AddEvent]:
    """Run ``model(*args, **kwargs)`` once (no_grad) and return every addition of two same-shape activations.

    ``keep_tensors=True`` keeps clones of both operands, the result, the pre-scale branch and the result after
    the unary ops that follow it (``AddEvent.tensors``). Every tensor in ``args``/``kwargs`` is an input.
    """
    return trace(model, args, kwargs, keep_tensors=keep_tensors).events


def channel_stats(x: torch.Tensor, axis: int) -> tuple[float, float]:
    """(avg_sq_mean, avg_var) in float64: per channel along ``axis``, the mean over every other axis squared, and
    the population variance, each averaged over channels (the SPP's definitions)."""
    v = x.detach().to(torch.float64).movedim(axis, 0).reshape(x.shape[axis], -1)
    mean = v.mean(1)
    var = v.var(1, correction=0)
    return float((mean**2).mean()), float(var.mean())

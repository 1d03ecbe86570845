"""Record a model's Signal Propagation Plot with forward hooks: the notebook entry point.

    import spp.hooks
    rec = spp.hooks.record(model, torch.randn(8, 3, 224, 224))      # one call, model left exactly as it was
    with spp.hooks.SignalRecorder(model) as recorder:                # or: call the model yourself, as often as you like
        model(x)
    recorder.snapshot().to_frame()

Hooks keep no activation: each tap folds its tensor into per-channel moments (``spp.moments``) and lets it go.
With ``grad=True`` they also hook each site tensor's gradient (a tensor hook), folded in the same way during the
backward pass: ``spp.hooks.record(model, x, grad=True)`` back-propagates a loss (``spp.gradients``) per micro-batch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import math
import platform
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spp.discovery import DEFAULT_RULES, Rule, find_taps, stage_ends
from spp.errors import SppError
from spp.modelstate import Mode, ModelState, uses_batch_statistics
from spp.moments import ChannelMoments, MergeItem, Workspace, batch_moments, merge_many, summarize
from spp.records import Record
from spp.schema import NAMES
from spp.taps import Difference, Site, Tap
from spp.validate import check_record_call, check_recorder_arguments, parse_channel_dims

Batch = torch.Tensor | Mapping[str, Any] | Sequence[Any]
Consumer = Callable[[torch.Tensor], None]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, Mapping):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _optional_argument(site: Site, module: str) -> bool:
    """Whether ``site`` is an input argument of the block ``module`` other than its first (one a caller may leave
    out: ``forward(x, shortcut=None)``)."""
    return site.kind == "input" and site.module == module and site.arg not in (0, "x", "hidden_states")


def _argument(module: nn.Module, arg: int | str) -> Callable[[tuple, dict], Any]:
    """A reader of one input argument of ``module``: by position, or by the parameter's name when passed as a
    keyword (HF layers are called with keywords)."""
    if isinstance(arg, str):
        return lambda args, kwargs: kwargs.get(arg)
    names: list[str] = []
    try:
        params = list(inspect.signature(module.forward).parameters.values())
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        pass
    name = names[arg] if arg < len(names) else None
    if arg == 0:
        return lambda args, kwargs: args[0] if args else _first_tensor(kwargs)
    return lambda args, kwargs: args[arg] if len(args) > arg else (kwargs.get(name) if name else None)


OUTPUT, BRANCH, SHORTCUT = 0, 1, 2
# The block's first input, kept for the check of a tap whose shortcut is an optional argument of the block
# (``forward(x, shortcut=None)``: called without it, the block adds to x): used only if that argument held none.
FIRST_INPUT = 3
_ROLE_NAMES = {OUTPUT: "stream", BRANCH: "branch", SHORTCUT: "shortcut"}
# Which running moments a pending item goes to: the forward's stream and branch, then their gradients.
GRAD_OUTPUT, GRAD_BRANCH = 2, 3
_GRADIENT_OF = {OUTPUT: GRAD_OUTPUT, BRANCH: GRAD_BRANCH}


class _Capture:
    """A site tensor whose gradient record() waits for: where it sits in the graph, and whether its hook fired."""

    __slots__ = ("device", "edge", "fired", "role", "shape", "tap")

    def __init__(self, tap: int, role: int, edge: Any, shape: tuple[int, ...], device: torch.device) -> None:
        self.tap, self.role, self.edge, self.shape, self.device = tap, role, edge, shape, device
        self.fired = False


class _FirstForward:
    """What the first forward of a recording collects to prove channel axes and check every tap's identity."""

    def __init__(self, model: nn.Module, verify: bool) -> None:
        from spp.provenance import Provenance

        self.provenance = Provenance(model)
        self.verify = verify
        self.batch: int = 0  # samples in this micro-batch (to check on the first sample only)
        self.kept: dict[tuple[int, int], torch.Tensor] = {}  # (tap, role) -> first-sample copy, for the check
        # (tap, role, the tensor itself, a copy, the shortcut a Difference branch subtracts): axis not yet proven.
        # The tensor itself is held so that the layer that consumes it later in the forward is still known by it;
        # the copy keeps the values it had here.
        self.deferred: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        # id(tensor) -> (the tensor, weakly; its proven axis; at which tap and role): a tensor read at two sites
        # (a block's output is the next block's input) has one layout
        self.by_tensor: dict[int, tuple[Any, int, str]] = {}
        self.checked: set[int] = set()

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of the first sample's part of ``x`` (all of it when the batch is not its leading axis)."""
        n = x.shape[0] if x.ndim else 0
        if self.batch > 1 and n and n % self.batch == 0:
            return x[: n // self.batch].detach().clone()
        return x.detach().clone()

    def close(self) -> None:
        self.provenance.close()
        self.kept.clear()
        self.deferred.clear()


class SignalRecorder:
    """Context manager that hooks a model's residual blocks and streams their SPP statistics.

    ``mode=None`` (default) leaves the model as it is, for use inside a training loop; ``"train"`` or ``"eval"``
    sets it for the duration (``spp.modelstate``: "train" = batch statistics in normalisation layers, dropout off
    unless ``stochastic``) and restores flags, buffers and attributes on exit, also when the forward raises.
    Hooks are always removed on exit. ``snapshot()`` returns the Record so far; ``reset()`` starts a new one.

    Trust: on the first forward, every tap's channel axis is proven from the layers that produced its tensors
    (``spp.axes``; ``channel_dim`` overrides it per tap pattern) and, with ``verify``, the residual identity
    ``output == act(shortcut + scale * branch)`` is checked on the first sample (``spp.verify``). A tap whose axis
    stays unproven or whose identity fails is refused: its row holds NaN and says why, never a wrong number.

    Cost per hooked tensor: per-channel sums and sums of squares (CPU, where precise enough: ``channel_sums``) or
    an exact two-pass mean / M2 (``channel_stats``) on its device, no host sync, no autograd graph, no copy kept.
    The C-sized Chan merges of all taps run batched once per forward (a hook on the model itself), or at
    ``snapshot()``/``moments()`` when the blocks are called some other way.

    ``grad=True``: where a forward runs with autograd on, each stream and branch tensor also gets a tensor hook that
    folds its gradient into moments of its own, on the axis proven for the tensor, when a backward pass reaches it
    (``loss.backward()`` in a training loop, or ``record(grad=True)``). A Difference branch's gradient is the
    stream's gradient times the branch's scale (d out / d branch for out = shortcut + scale * branch).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rules: Sequence[Rule] = DEFAULT_RULES,
        blocks: Sequence[str] | None = None,
        residual_tap: str | None = None,
        channel_dim: int | str | Mapping[str, int] | Sequence[str] | None = None,
        taps: Sequence[Tap] | None = None,
        mode: Mode | None = None,
        stochastic: bool = False,
        verify: bool | None = None,
        settings: dict[str, Any] | None = None,
        grad: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SppError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(grad, bool):
            raise SppError(f"grad must be True or False, not {grad!r}")
        check_recorder_arguments(mode=mode, stochastic=stochastic, blocks=blocks, residual_tap=residual_tap,
                                 channel_dim=channel_dim, taps=taps, settings=settings)
        self.model = model
        self.taps: list[Tap] = list(taps) if taps is not None else find_taps(
            model, rules=rules, blocks=blocks, residual_tap=residual_tap
        )
        self.settings = dict(settings or {})
        self._overrides = parse_channel_dims(channel_dim)
        self._verify = (mode is not None and not stochastic) if verify is None else bool(verify)
        self._state = ModelState(model, mode, stochastic=stochastic)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stash: dict[Site, torch.Tensor] = {}
        # (0 = output / 1 = residual, tap index, n, mean or Sums, m2 or None) per hooked tensor, for _flush
        self._pending: list[tuple[int, int, int, Any, torch.Tensor | None]] = []
        self._workspace = Workspace()  # memory the hooks reuse: no allocation of theirs outlives them
        self._axes: dict[tuple[int, int], int] = {}
        self._axis_source: dict[tuple[int, int], str] = {}
        self._shapes: dict[tuple[int, int], tuple[int, ...]] = {}
        self._refused: dict[int, str] = {}
        self._verdicts: dict[int, tuple[str, str]] = {}
        self._first: _FirstForward | None = None
        self._check_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._scales: dict[int, torch.Tensor] = {}
        self._grad = grad
        self._captures: list[_Capture] | None = None  # record()'s backward pass: the sites it waits for
        self._no_gradient: dict[int, str] = {}  # tap -> why its gradient statistics are missing
        for i, tap in enumerate(self.taps):
            if tap.refusal:
                self._refuse(i, tap.refusal)
            elif tap.residual_scale:
                scale = _scale_value(model, tap.residual_scale)
                if scale is None:
                    self._refuse(i, f"its branch scale {tap.residual_scale} is not a tensor of the model")
                elif bool((scale == 0).any()):
                    self._refuse(i, f"its branch scale {tap.residual_scale} holds zeros: the branch before the "
                                    "scale cannot be recovered from output - shortcut")
                else:
                    self._scales[i] = scale.detach()
        self.reset()

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded so far (the hooks, the proven axes and the verdicts stay)."""
        self._pending.clear()
        self._workspace.rewind()
        # stream, branch, and (grad=True) the stream's and the branch's gradients, per tap
        self._moments = tuple([ChannelMoments() for _ in self.taps] for _ in range(4))
        self._no_gradient.clear()
        self.samples = 0
        self.batches = 0

    @property
    def outputs(self) -> list[ChannelMoments]:
        """Per tap, the moments of the block output."""
        self._flush()
        return self._moments[0]

    @property
    def residuals(self) -> list[ChannelMoments]:
        """Per tap, the moments of the residual branch (never updated for the stem)."""
        self._flush()
        return self._moments[1]

    @property
    def grad_outputs(self) -> list[ChannelMoments]:
        """Per tap, the moments of the gradient with respect to the block output (``grad=True``)."""
        self._flush()
        return self._moments[GRAD_OUTPUT]

    @property
    def grad_residuals(self) -> list[ChannelMoments]:
        """Per tap, the moments of the gradient with respect to the residual branch before its scale."""
        self._flush()
        return self._moments[GRAD_BRANCH]

    def __enter__(self) -> SignalRecorder:
        try:
            self._state.apply()
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore the model; safe to call twice."""
        if self._first is not None:
            self._first.close()
            self._first = None
        for h in [*self._handles, *self._check_handles]:
            h.remove()
        self._handles.clear()
        self._check_handles.clear()
        self._stash.clear()
        self._workspace.release()
        self._state.restore()

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _register(self) -> None:
        modules = dict(self.model.named_modules())
        consumers: dict[Site, list[Consumer]] = {}
        checks: dict[Site, list[Consumer]] = {}

        def add(site: Site, fn: Consumer, into: dict[Site, list[Consumer]] = consumers) -> None:
            if site.module not in modules:
                raise SppError(f"tap site {site} names no module of {type(self.model).__name__}")
            into.setdefault(site, []).append(fn)

        # The batch counter first (it opens the first forward), the end-of-forward hook last.
        self._handles.append(self.model.register_forward_pre_hook(self._count_batch, with_kwargs=True))
        for i, tap in enumerate(self.taps):
            if isinstance(tap.residual, Difference):
                add(tap.residual.subtrahend, self._stasher(tap.residual.subtrahend))
            add(tap.output, self._consumer(i, OUTPUT))
            if isinstance(tap.residual, Site):
                add(tap.residual, self._consumer(i, BRANCH))
            shortcut = tap.residual.subtrahend if isinstance(tap.residual, Difference) else tap.shortcut
            if shortcut is not None and tap.residual is not None:  # the first forward only: axes and the check
                add(shortcut, self._consumer(i, SHORTCUT), checks)
                if _optional_argument(shortcut, tap.module) and isinstance(tap.residual, Site):
                    add(Site(tap.module, "input", 0), self._first_input_keeper(i), checks)

        for into, handles in ((consumers, self._handles), (checks, None)):
            for site, fns in into.items():
                module = modules[site.module]
                if site.kind == "input":
                    handle = module.register_forward_pre_hook(_pre_hook(fns, _argument(module, site.arg)),
                                                              with_kwargs=True)
                else:
                    handle = module.register_forward_hook(_post_hook(fns))
                (handles if handles is not None else self._check_handles).append(handle)
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))

    def _first_input_keeper(self, i: int) -> Consumer:
        """Keeps the first sample of block ``i``'s first input for its check (see ``FIRST_INPUT``)."""

        def keep(raw: torch.Tensor) -> None:
            first = self._first
            if first is not None and self._verify and i not in self._refused:
                first.kept[(i, FIRST_INPUT)] = first.keep(raw.detach())

        return keep

    def _consumer(self, i: int, role: int) -> Consumer:
        pending, ws, axes, refused = self._pending, self._workspace, self._axes, self._refused
        tap = self.taps[i]
        difference = tap.residual.subtrahend if isinstance(tap.residual, Difference) else None

        def consume(raw: torch.Tensor) -> None:
            if i in refused:
                return
            if self._grad and role != SHORTCUT and torch.is_grad_enabled():
                self._watch_gradient(i, role, raw)
            axis = axes.get((i, role))
            first = self._first
            x = raw.detach()
            if role == SHORTCUT and first is not None and self._verify and isinstance(tap.residual, Site):
                first.kept[(i, SHORTCUT)] = first.keep(x)  # for the check, whether or not its axis is proven
            if axis is None:
                if first is None:
                    return  # never proven: refused when the first forward ended
                axis = self._establish(i, role, raw, first)
                if axis is None:
                    if difference is not None and role == OUTPUT:  # keep what the branch subtracts, for later
                        first.deferred[-1] = (*first.deferred[-1][:4], self._stash.pop(difference, None))
                    return
            if role != SHORTCUT:
                pending.append((role, i, *batch_moments(x, axis, ws)))
            if difference is not None and role == OUTPUT:
                shortcut = self._stash.pop(difference, None)
                if shortcut is not None and shortcut.shape == x.shape:
                    axes.setdefault((i, BRANCH), axis)
                    pending.append((BRANCH, i, *batch_moments(self._unscaled(i, x - shortcut), axis, ws)))
            if first is not None and self._verify and isinstance(tap.residual, Site) and role != SHORTCUT:
                first.kept[(i, role)] = first.keep(x)
                if role == OUTPUT:
                    self._check(i, first)

        return consume

    # ---- gradients (grad=True) ----------------------------------------------------------------------------------
    def _watch_gradient(self, i: int, role: int, raw: torch.Tensor) -> None:
        """Hook the gradient of a site tensor (before any later in-place op changes it: autograd then still hands
        the hook the gradient with respect to the value read here)."""
        if not raw.requires_grad:
            self._no_gradient.setdefault(i, f"its {_ROLE_NAMES[role]} tensor is not in the autograd graph (nothing "
                                            "it was computed from requires grad)")
            return
        capture = None
        if self._captures is not None:
            from torch.autograd.graph import get_gradient_edge

            capture = _Capture(i, role, get_gradient_edge(raw), tuple(raw.shape), raw.device)
            self._captures.append(capture)
        raw.register_hook(self._gradient_hook(i, role, capture))

    def _gradient_hook(self, i: int, role: int, capture: _Capture | None) -> Callable[[torch.Tensor], None]:
        pending, ws, axes, refused = self._pending, self._workspace, self._axes, self._refused
        difference = isinstance(self.taps[i].residual, Difference) and role == OUTPUT

        def hook(grad: torch.Tensor) -> None:
            if capture is not None:
                capture.fired = True
            if self._first is not None:  # a backward before the forward's end hook (blocks called another way)
                self._finish_first()
            axis = axes.get((i, role))
            if i in refused or axis is None:
                return
            g = grad.detach()
            pending.append((_GRADIENT_OF[role], i, *batch_moments(g, axis, ws)))
            branch_axis = axes.get((i, BRANCH))
            if difference and branch_axis is not None:
                pending.append((GRAD_BRANCH, i, *batch_moments(self._rescaled(i, g), branch_axis, ws)))

        return hook

    def _rescaled(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to a Difference branch before its scale: the stream's times the scale."""
        scale = self._scales.get(i)
        return grad if scale is None else grad * scale.to(grad.device, grad.dtype)

    def _zero_gradient(self, capture: _Capture) -> None:
        """A site the loss does not depend on: its gradient is exactly zero (counted, so means and variances
        over several micro-batches stay right)."""
        i, role = capture.tap, capture.role
        axis = self._axes.get((i, role))
        if i in self._refused or axis is None or not capture.shape:
            return
        channels = capture.shape[axis]
        n = math.prod(capture.shape) // channels if channels else 0
        zeros = torch.zeros(channels, dtype=torch.float64 if capture.device.type != "mps" else torch.float32,
                            device=capture.device)
        self._pending.append((_GRADIENT_OF[role], i, n, zeros, zeros))
        branch_axis = self._axes.get((i, BRANCH))
        if role == OUTPUT and isinstance(self.taps[i].residual, Difference) and branch_axis is not None:
            self._pending.append((GRAD_BRANCH, i, n, zeros, zeros))

    def forward_backward(self, batch: Batch, loss: Callable[[Any, int], torch.Tensor], index: int = 0) -> Any:
        """One micro-batch with gradients: the forward with a graph, ``loss(output, index)``, and a backward pass
        that reaches every hooked site (``spp.gradients``), computes no parameter's gradient and keeps no gradient
        tensor. Call it with autograd on; ``record(grad=True)`` does. Returns the output's part the loss read
        (``where`` of a built-in loss) or ""."""
        from spp import gradients

        if not self._grad:
            raise SppError("forward_backward needs a recorder made with grad=True")
        captures: list[_Capture] = []
        self._captures = captures
        try:
            output = call_model(self.model, gradients.with_graph(batch))
            value = gradients.check_scalar(loss(output, index), "its output")
            del output
            roots, unreachable = gradients.graph_walk(value, [c.edge for c in captures])
            try:
                gradients.backward_to(value, gradients.distinct_edges([captures[k].edge for k in roots]))
            except RuntimeError as exc:  # autograd's own complaint about the model (in-place ops on saved tensors)
                from spp.errors import one_line

                raise SppError(f"the backward pass of --grad failed: {one_line(exc, 200, with_type=False)}; the "
                               "model cannot be differentiated as it runs here: record without --grad") from None
            del value
            lost = set(unreachable)
            for k, capture in enumerate(captures):
                if k in lost:
                    self._zero_gradient(capture)
                elif not capture.fired:
                    self._no_gradient.setdefault(capture.tap, f"the gradient of its {_ROLE_NAMES[capture.role]} "
                                                              "never arrived in the backward pass")
        finally:
            self._captures = None
            captures.clear()
            self._flush()
        return getattr(loss, "where", "")

    def _unscaled(self, i: int, difference: torch.Tensor) -> torch.Tensor:
        """output - shortcut, divided by the branch's scale where the rule named it (a per-channel factor)."""
        scale = self._scales.get(i)
        return difference if scale is None else difference / scale.to(difference.device, difference.dtype)

    def _stasher(self, site: Site) -> Consumer:
        stash = self._stash

        def keep(x: torch.Tensor) -> None:
            # A copy: a block that adds in place (x += f(x)) would otherwise overwrite the shortcut we subtract.
            stash[site] = x.detach().clone()

        return keep

    # ---- the first forward: axes proven, identities checked ------------------------------------------------------
    def _override(self, i: int) -> int | None:
        tap, axis = self.taps[i], None
        for pattern, value in self._overrides:
            if fnmatch.fnmatchcase(tap.name, pattern) or fnmatch.fnmatchcase(tap.module, pattern):
                axis = value
        return axis

    def _declared(self, i: int, role: int) -> int | None:
        tap = self.taps[i]
        if role == BRANCH and tap.residual_channel_dim is not None:
            return tap.residual_channel_dim
        return tap.channel_dim

    def _establish(self, i: int, role: int, x: torch.Tensor, first: _FirstForward) -> int | None:
        """The channel axis of ``x``, read at (tap ``i``, ``role``): proven now, or deferred to the forward's end."""
        key, shape = (i, role), tuple(x.shape)
        self._shapes[key] = shape
        axis, source = self._prove(i, role, x, first, final=False)
        if axis is None:
            first.deferred.append((i, role, x, x.detach().clone(), None))
            return None
        self._axes[key], self._axis_source[key] = axis, source
        self._remember(x, axis, i, role, first)
        return axis

    def _remember(self, x: torch.Tensor, axis: int, i: int, role: int, first: _FirstForward) -> None:
        with contextlib.suppress(TypeError):  # a tensor without weak references is simply not remembered
            first.by_tensor[id(x)] = (weakref.ref(x), axis, f"the {_ROLE_NAMES[role]} of {self.taps[i].name}")

    def _prove(self, i: int, role: int, x: torch.Tensor, first: _FirstForward,
               final: bool) -> tuple[int | None, str]:
        """(axis, how it was proven) for ``x`` at (tap, role); (None, why not) when nothing proves it."""
        from spp.axes import check_axis

        tap, shape = self.taps[i], tuple(x.shape)
        override = self._override(i)
        if override is not None:
            if not -x.ndim <= override < x.ndim:
                raise SppError(f"channel axis {override} does not exist in a tensor of shape {shape} (--channel-dim "
                               f"for {tap.name}; valid: {-x.ndim} to {x.ndim - 1})")
            return override % x.ndim, "--channel-dim"
        if role == BRANCH and tap.residual_transforms:
            # The branch is read before transposes / permutes: its channel axis is the stream's, mapped back.
            stream = self._axes.get((i, OUTPUT))
            if stream is None:
                return None, "the stream's axis, which its channel axis follows, is not proven yet"
            mapped = _through_transforms(stream, tap.residual_transforms, x.ndim)
            if mapped is None:
                return None, f"its layout ops {tap.residual_transforms} do not map the stream's axis {stream}"
            return mapped, f"the stream's axis {stream} through {tap.residual_transforms}"
        site = self._site(i, role)
        evidence = None
        if site is not None:
            evidence = first.provenance.evidence_of(x)  # the layer that made it (an input is an output too)
            if evidence is None and site.arg == 0:
                evidence = first.provenance.leaf_evidence(self.model.get_submodule(site.module), site.kind)
        if evidence is None and final:
            evidence = first.provenance.consumer_evidence(x)
        if evidence is not None:
            problem = check_axis(shape, evidence)
            if problem is not None:
                return None, problem
            resolved = evidence.resolve(x.ndim)
            return resolved, evidence.layer
        same = first.by_tensor.get(id(x))
        if same is not None and same[0]() is x:
            return same[1], f"the same tensor as {same[2]}"
        linked = self._linked_axis(i, role, shape)
        if linked is not None:
            return linked
        declared = self._declared(i, role)
        if declared is not None and -x.ndim <= declared < x.ndim:
            return declared % x.ndim, f"the rule ({tap.rule})"
        return None, "no layer that produced or consumed it says which axis holds the channels"

    def _linked_axis(self, i: int, role: int, shape: tuple[int, ...]) -> tuple[int, str] | None:
        """The axis of a tensor of the same tap this one is added to, or is the sum of, when the shapes agree (an
        elementwise addition keeps the layout): the stream, its shortcut and its branch (unless the rule reads the
        branch in another layout). Taps are not linked to each other by shape: a permute between blocks can keep
        the shape (H = W = C) and change the layout; only the same tensor links them (``by_tensor``)."""
        tap = self.taps[i]
        partners = [OUTPUT, SHORTCUT] + ([BRANCH] if tap.residual_channel_dim is None else [])
        if role == BRANCH and tap.residual_channel_dim is not None:
            partners = []
        candidates = [(i, p) for p in partners if p != role] if tap.residual is not None else []
        for key in candidates:
            if key in self._axes and self._shapes.get(key) == shape:
                return self._axes[key], f"the same layout as the {_ROLE_NAMES[key[1]]} of {self.taps[key[0]].name}"
        return None

    def _site(self, i: int, role: int) -> Site | None:
        tap = self.taps[i]
        if role == OUTPUT:
            return tap.output
        if role == SHORTCUT:
            return tap.shortcut
        return tap.residual if isinstance(tap.residual, Site) else None

    def _check(self, i: int, first: _FirstForward) -> None:
        """The residual identity of tap ``i`` on its first-sample copies, once all three are in."""
        if i in first.checked or self.taps[i].residual is None:
            return
        kept = first.kept
        via = ""
        if (i, SHORTCUT) not in kept and (i, FIRST_INPUT) in kept and (i, OUTPUT) in kept:
            kept[(i, SHORTCUT)] = kept.pop((i, FIRST_INPUT))  # the optional shortcut argument was not given
            via = f" (its shortcut argument {self.taps[i].shortcut} was None: checked against its first input)"
        if not all((i, r) in kept for r in (OUTPUT, BRANCH, SHORTCUT)):
            return
        first.checked.add(i)
        kept.pop((i, FIRST_INPUT), None)
        from spp.verify import check_residual

        o, b, s = kept.pop((i, OUTPUT)), kept.pop((i, BRANCH)), kept.pop((i, SHORTCUT))
        tap = self.taps[i]
        if tap.post_activation not in ("", "relu"):
            self._verdicts[i] = ("unchecked", f"{tap.post_activation} follows the addition")
            return
        result = check_residual(o, s, b, output_axis=self._axes[(i, OUTPUT)], branch_axis=self._axes[(i, BRANCH)],
                                post_activation=tap.post_activation, compute_dtype=o.dtype)
        if result.ok:
            self._verdicts[i] = ("verified", result.detail + via)
        else:
            self._refuse(i, f"the residual identity fails on the first micro-batch: {result.detail}; the sites "
                            f"{tap.output} / {tap.residual} / {tap.shortcut} are not this block's stream, branch "
                            "and shortcut (name them with --blocks / --residual-tap, or add a rule)")

    def _refuse(self, i: int, why: str) -> None:
        self._refused.setdefault(i, why)
        self._verdicts[i] = ("refused", self._refused[i])

    def _finish_first(self) -> None:
        """End of the first forward: prove deferred axes (from the layers that consumed the tensors), fold their
        moments in, check the remaining identities, refuse what stays unproven."""
        first = self._first
        if first is None:
            return
        self._first = None
        try:
            waiting = list(first.deferred)
            while waiting:  # one proof can make another (a stream proven later, then its branch)
                proven = [d for d in waiting if self._prove(d[0], d[1], d[2], first, final=True)[0] is not None]
                if not proven:
                    break
                waiting = [d for d in waiting if d not in proven]
                for d in proven:
                    self._fold_deferred(first, *d)
            for i, role, raw, x, _ in waiting:
                if i in self._refused:
                    continue
                _, source = self._prove(i, role, raw, first, final=True)
                hint = f"--channel-dim '{self.taps[i].name}=AXIS'"
                self._refuse(i, f"the channel axis of its {_ROLE_NAMES[role]} (shape {tuple(x.shape)}) is "
                                f"unproven: {source}; name it with {hint}")
            for i, tap in enumerate(self.taps):
                if i in self._refused or i in self._verdicts or tap.residual is None:
                    continue
                if (i, OUTPUT) not in self._axes:
                    self._refuse(i, f"its stream site {tap.output} was never reached in the forward")
                elif (i, BRANCH) not in self._axes:
                    self._refuse(i, f"its branch site {tap.residual} was never reached in the forward")
                elif isinstance(tap.residual, Difference):
                    self._verdicts[i] = ("unchecked", "the branch is read as output - shortcut")
                elif not self._verify:
                    self._verdicts[i] = ("unchecked", "")
                elif tap.shortcut is None:
                    self._verdicts[i] = ("unchecked", "the rule names no shortcut site")
                else:  # the addition the rule describes did not happen: its shortcut was not a tensor
                    self._refuse(i, f"its shortcut site {tap.shortcut} held no tensor in the forward, so the "
                                    "addition the rule found is not what ran; name the blocks with --blocks")
            if self.taps and (0, OUTPUT) not in self._axes and 0 not in self._refused:
                self._refuse(0, f"the stem site {self.taps[0].output} was never reached in the forward")
        finally:
            first.close()
            for h in self._check_handles:
                h.remove()
            self._check_handles.clear()

    def _fold_deferred(self, first: _FirstForward, i: int, role: int, raw: torch.Tensor, x: torch.Tensor,
                       subtrahend: torch.Tensor | None) -> None:
        """A deferred tensor whose axis is now proven: its moments (and a Difference branch's) fold in."""
        if i in self._refused:
            return
        axis, source = self._prove(i, role, raw, first, final=True)
        assert axis is not None
        self._axes[(i, role)], self._axis_source[(i, role)] = axis, source
        self._remember(raw, axis, i, role, first)
        if role != SHORTCUT:
            self._pending.append((role, i, *batch_moments(x, axis, self._workspace)))
        if subtrahend is not None and subtrahend.shape == x.shape:
            self._axes.setdefault((i, BRANCH), axis)
            branch = self._unscaled(i, x - subtrahend)
            self._pending.append((BRANCH, i, *batch_moments(branch, axis, self._workspace)))
        if self._verify and isinstance(self.taps[i].residual, Site):
            first.kept[(i, role)] = first.keep(x)
            self._check(i, first)

    def _count_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward() != -1:
            return  # a checkpointed model recomputed in backward: the same batch again
        x = _first_tensor(args) if args else _first_tensor(kwargs)
        n = int(x.shape[0]) if x is not None and x.ndim else 0
        if self.batches == 0 and self._first is None and not self._axes and not self._refused:
            self._first = _FirstForward(self.model, self._verify)
        if self._first is not None:
            self._first.batch = n
        self.samples += n
        self.batches += 1

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._stash.clear()
        self._finish_first()
        self._flush()

    def _flush(self) -> None:
        """Merge the moments of every tensor hooked since the last flush, in the order they were seen."""
        if not self._pending:
            return
        pending, lists, refused = list(self._pending), self._moments, self._refused
        self._pending.clear()
        items: list[MergeItem] = [(lists[which][i], n, mean, m2) for which, i, n, mean, m2 in pending
                                  if i not in refused]
        merge_many(items)
        self._workspace.rewind()  # the merged results were copied into the running moments

    # ---- results -----------------------------------------------------------------------------------------------
    def moments(self) -> list[tuple[ChannelMoments, ChannelMoments]]:
        """The raw per-channel moments, (output, residual) per tap, e.g. to merge across processes."""
        self._finish_first()
        return list(zip(self.outputs, self.residuals, strict=True))

    def gradient_moments(self) -> list[tuple[ChannelMoments, ChannelMoments]]:
        """The gradients' raw per-channel moments, (output, residual) per tap (empty without ``grad=True``)."""
        self._finish_first()
        return list(zip(self.grad_outputs, self.grad_residuals, strict=True))

    def verdicts(self) -> list[tuple[str, str]]:
        """Per tap, (check, detail): "verified", "unchecked", "refused" (with why), or "-" for the stem."""
        self._finish_first()
        return [("-", "") if t.residual is None and i not in self._refused else self._verdicts.get(i, ("", ""))
                for i, t in enumerate(self.taps)]

    def snapshot(self) -> Record:
        """The Record of everything seen since the last ``reset``; the moments move to the host once, here."""
        verdicts = self.verdicts()
        self._flush()
        for i in self._refused:  # moments a refused tap gathered before its refusal are not shown
            for moments in self._moments:
                moments[i] = ChannelMoments()
        for i in self._no_gradient:  # a gradient missing in some micro-batch: no gradient statistics at all
            self._moments[GRAD_OUTPUT][i], self._moments[GRAD_BRANCH][i] = ChannelMoments(), ChannelMoments()
        n = len(self.taps)
        summaries = summarize([m for moments in self._moments for m in moments])
        o_all, r_all, go_all, gr_all = (summaries[k * n : (k + 1) * n] for k in range(4))
        rows = []
        for i, (tap, o, r, go, gr) in enumerate(zip(self.taps, o_all, r_all, go_all, gr_all, strict=True)):
            check, detail = verdicts[i]
            note = tap.note
            if tap.residual is not None and r.count and r.avg_var == 0.0 and r.avg_sq_mean == 0.0:
                note = note or "residual branch is exactly zero (zero-init gain?): a flat SPP is the truth here"
            if check == "refused":
                note = f"refused: {detail}" + (f"; {note}" if note else "")
            elif check == "unchecked" and detail:
                note = f"unchecked: {detail}" + (f"; {note}" if note else "")
            elif i in self._no_gradient:
                note = f"no gradient statistics: {self._no_gradient[i]}" + (f"; {note}" if note else "")
            shape = self._shapes.get((i, OUTPUT))
            row = {
                "block": i,
                "layer": tap.layer if tap.layer >= 0 else i,
                "branch": tap.branch,
                "name": tap.name,
                "stage": tap.stage,
                "avg_sq_mean": o.avg_sq_mean,
                "avg_var": o.avg_var,
                "res_avg_var": r.avg_var if tap.residual is not None else math.nan,
                "expected_var": float(tap.expected_var) if tap.expected_var is not None else math.nan,
                "grad_avg_sq_mean": go.avg_sq_mean,
                "grad_avg_var": go.avg_var,
                "grad_res_avg_var": gr.avg_var if tap.residual is not None else math.nan,
                "channels": o.channels,
                "count": o.count,
                "nonfinite": o.nonfinite_channels + r.nonfinite_channels + go.nonfinite_channels
                + gr.nonfinite_channels,
                "axis": self._axes.get((i, OUTPUT), -1),
                "shape": "x".join(map(str, shape[1:])) if shape else "",
                "check": check,
                "module": tap.module,
                "output_site": str(tap.output),
                "residual_site": str(tap.residual) if tap.residual is not None else "",
                "stream": tap.stream,
                "rule": tap.rule,
                "note": note,
            }
            rows.append({k: row[k] for k in NAMES})
        settings = {
            "samples": self.samples,
            "batches": self.batches,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "spp": _spp_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.settings,
        }
        return Record(rows=rows, stage_ends=stage_ends(self.taps), settings=settings)


def _scale_value(model: nn.Module, spec: str) -> torch.Tensor | None:
    """A branch scale a rule named: a number, or the dotted name of a tensor of the model."""
    try:
        return torch.tensor(float(spec))
    except ValueError:
        pass
    value: Any = model
    for part in spec.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _through_transforms(axis: int, transforms: Sequence[tuple[str, tuple[int, ...]]], ndim: int) -> int | None:
    """The source tensor's axis that becomes ``axis`` of ``transforms`` applied to it (transposes, permutes)."""
    for name, dims in reversed(transforms):
        if name == "transpose" and len(dims) == 2:
            a, b = (d % ndim for d in dims)
            axis = b if axis == a else a if axis == b else axis
        elif name == "permute" and len(dims) == ndim:
            axis = dims[axis] % ndim
        else:
            return None
    return axis


def _graph_task_id() -> int:
    return -1


# -1 outside a backward pass; an activation-checkpointing recompute runs the forward inside one, and must not count.
_in_backward = getattr(torch._C, "_current_graph_task_id", _graph_task_id)


def _pre_hook(fns: list[Consumer], read: Callable[[tuple, dict], Any] | None = None) -> Callable[..., None]:
    """A forward pre-hook handing one input argument to every consumer of its site (which detach it: the tensor
    itself is passed, so that the first forward can trace it back to the layer that made it)."""
    read = read or (lambda args, kwargs: args[0] if args else _first_tensor(kwargs))

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = read(args, kwargs)
        if isinstance(x, torch.Tensor) and _in_backward() == -1:
            for f in fns:
                f(x)

    return hook


def _post_hook(fns: list[Consumer]) -> Callable[..., None]:
    """A forward hook handing the module's output (its first tensor) to every consumer of its site."""
    if len(fns) == 1:
        fn = fns[0]

        def hook1(module: nn.Module, args: tuple, output: Any) -> None:
            x = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if x is not None and _in_backward() == -1:
                fn(x)

        return hook1

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        if x is not None and _in_backward() == -1:
            for f in fns:
                f(x)

    return hook


def _spp_version() -> str:
    from spp import __version__

    return __version__


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on one micro-batch: a tensor is the first argument, a mapping the keyword arguments
    (``{"inputs_embeds": x}``), a tuple or list the positional arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise SppError(f"a micro-batch must be a tensor, a dict of keyword arguments or a tuple of arguments, not "
                   f"{type(batch).__name__}")


def batch_size_of(batch: Batch) -> int:
    """Samples in a micro-batch: the leading size of its first tensor."""
    x = _first_tensor(batch)
    return int(x.shape[0]) if x is not None and x.ndim else 1


def _micro_batches(inputs: Any) -> Iterable[Batch]:
    if isinstance(inputs, (torch.Tensor, Mapping)):
        return (inputs,)
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise SppError(f"inputs must be a tensor, a dict of keyword arguments, or an iterable of micro-batches, not "
                       f"{type(inputs).__name__}")
    return inputs


def record(
    model: nn.Module,
    inputs: Batch | Iterable[Batch],
    *,
    mode: Mode = "train",
    stochastic: bool = False,
    rules: Sequence[Rule] = DEFAULT_RULES,
    blocks: Sequence[str] | None = None,
    residual_tap: str | None = None,
    channel_dim: int | str | Mapping[str, int] | Sequence[str] | None = None,
    taps: Sequence[Tap] | None = None,
    verify: bool = True,
    settings: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    distributed: bool = False,
    grad: bool = False,
    loss: str | Callable[[Any], torch.Tensor] = "random",
    loss_seed: int = 0,
    batch_indices: Sequence[int] | None = None,
) -> Record:
    """Run ``model`` on ``inputs`` (one micro-batch, or an iterable of them) and return its SPP Record.

    A micro-batch is a tensor (the model's first argument), a dict of keyword arguments (``{"inputs_embeds": x}``)
    or a tuple of arguments. ``mode="train"`` normalises BatchNorm with each micro-batch's statistics (as at the
    start of training) with dropout off (``stochastic=True`` keeps dropout and drop-path live); ``"eval"`` uses
    the running statistics. Either way the model's state_dict, training flags, attributes and hooks are exactly as
    before afterwards, also when the forward raises. Micro-batches merge exactly (Chan et al.), so statistics over k
    micro-batches equal those over their concatenation wherever the model has no batch-dependent layers.
    ``on_batch(samples_in_batch)`` is called after each micro-batch (progress bars).

    ``channel_dim``: the channel axis where spp cannot prove it (an int for every tap, or ``{"pattern": axis}`` /
    ``"pattern=axis"`` per tap name). ``verify``: check every tap's residual identity on the first micro-batch and
    refuse the taps where it fails (see ``SignalRecorder``).

    ``distributed=True``: every rank of the initialised default process group calls ``record`` with its own
    micro-batches (possibly none); the moments are merged across ranks (``spp.distributed.merge_moments``) and
    every rank returns the Record over all ranks' samples.

    ``grad=True``: after each micro-batch's forward, back-propagate ``loss`` and record the gradient's statistics
    at every tap as well (columns ``grad_avg_sq_mean``, ``grad_avg_var``, ``grad_res_avg_var``): ``"random"``
    (default: sum(output * g), g ~ N(0, 1) drawn from (``loss_seed``, micro-batch number)), ``"xent"`` (a
    classifier's cross-entropy against random labels), or a function of the model's output returning a scalar
    (``spp.gradients`` says more). The forward statistics are the same as without ``grad``. No parameter's
    ``.grad`` is computed or touched, ``requires_grad`` flags are as before afterwards (frozen parameters are
    made to require grad for the run, so every site is in the graph), and no gradient tensor is kept.
    ``batch_indices``: each micro-batch's number in the whole run (default 0, 1, ...), for the loss's draw (a run
    sharded over ranks then draws what one process would).
    """
    from spp.gradients import check_loss, make_loss, trainable
    from spp.validate import check_seed

    check_record_call(on_batch=on_batch, distributed=distributed, settings=settings)
    if not isinstance(grad, bool):
        raise SppError(f"grad must be True or False, not {grad!r}")
    if grad:
        check_loss(loss)
        check_seed(loss_seed)
    batches = _micro_batches(inputs)
    loss_of, loss_settings = make_loss(loss, loss_seed) if grad else (None, {})
    recorder = SignalRecorder(
        model, rules=rules, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim, taps=taps, mode=mode,
        stochastic=stochastic, verify=verify and not stochastic, grad=grad,
        settings={"mode": mode, "stochastic": bool(stochastic), **({"grad": True} if grad else {}), **loss_settings,
                  **(settings or {})},
    )
    batch_stats = mode == "train" and any(uses_batch_statistics(m) for m in model.modules())
    numbers = list(batch_indices) if batch_indices is not None else None
    where = ""
    with recorder, contextlib.ExitStack() as stack:
        if grad:  # a graph for the forward, also inside a caller's no_grad / inference_mode
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(trainable(model))
        else:
            stack.enter_context(torch.no_grad())
        for j, batch in enumerate(batches):
            size = batch_size_of(batch)
            if batch_stats and size == 1:
                raise SppError(
                    f"micro-batch {j} has batch size 1 and the model has BatchNorm in train mode, which would "
                    "normalise the sample on its own; give micro-batches of 2 or more samples, or use mode='eval'"
                )
            if loss_of is not None:
                index = numbers[j] if numbers is not None and j < len(numbers) else j
                where = recorder.forward_backward(batch, loss_of, index) or where
            else:
                call_model(model, batch)
            if on_batch is not None:
                on_batch(size)
    if where:
        recorder.settings["grad_output"] = where
    if distributed:
        from spp.distributed import merge_moments

        merge_moments(recorder)
    if recorder.batches == 0:
        raise SppError("no input batches: nothing was recorded")
    return recorder.snapshot()

"""Record a model's Signal Propagation Plot with forward hooks: the notebook entry point.

    import spp.hooks
    rec = spp.hooks.record(model, torch.randn(8, 3, 224, 224))      # one call, model left exactly as it was
    with spp.hooks.SignalRecorder(model) as recorder:                # or: call the model yourself, as often as you like
        model(x)
    recorder.snapshot().to_frame()

Hooks keep no activation: each tap folds its tensor into per-channel moments (``spp.moments``) and lets it go.
"""

from __future__ import annotations

import inspect
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spp.discovery import DEFAULT_RULES, Rule, find_taps, stage_ends
from spp.errors import SppError
from spp.modelstate import Mode, ModelState, uses_batch_statistics
from spp.moments import ChannelMoments, MergeItem, Workspace, batch_moments, channel_axis, merge_many, summarize
from spp.records import Record
from spp.schema import NAMES
from spp.taps import Difference, Site, Tap
from spp.validate import check_record_call, check_recorder_arguments

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


class SignalRecorder:
    """Context manager that hooks a model's residual blocks and streams their SPP statistics.

    ``mode=None`` (default) leaves the model as it is, for use inside a training loop; ``"train"`` or ``"eval"``
    sets it for the duration (``spp.modelstate``: "train" = batch statistics in normalisation layers, dropout off
    unless ``stochastic``) and restores flags, buffers and attributes on exit, also when the forward raises.
    Hooks are always removed on exit. ``snapshot()`` returns the Record so far; ``reset()`` starts a new one.

    Cost per hooked tensor: per-channel sums and sums of squares (CPU, where precise enough: ``channel_sums``) or
    an exact two-pass mean / M2 (``channel_stats``) on its device, no host sync, no autograd graph, no copy kept.
    The C-sized Chan merges of all taps run batched once per forward (a hook on the model itself), or at
    ``snapshot()``/``moments()`` when the blocks are called some other way.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rules: Sequence[Rule] = DEFAULT_RULES,
        blocks: Sequence[str] | None = None,
        residual_tap: str | None = None,
        channel_dim: int | None = None,
        taps: Sequence[Tap] | None = None,
        mode: Mode | None = None,
        stochastic: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SppError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        check_recorder_arguments(mode=mode, stochastic=stochastic, blocks=blocks, residual_tap=residual_tap,
                                 channel_dim=channel_dim, taps=taps, settings=settings)
        self.model = model
        self.taps: list[Tap] = list(taps) if taps is not None else find_taps(
            model, rules=rules, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim
        )
        self.settings = dict(settings or {})
        self._state = ModelState(model, mode, stochastic=stochastic)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stash: dict[Site, torch.Tensor] = {}
        # (0 = output / 1 = residual, tap index, n, mean or Sums, m2 or None) per hooked tensor, for _flush
        self._pending: list[tuple[int, int, int, Any, torch.Tensor | None]] = []
        self._workspace = Workspace()  # memory the hooks reuse: no allocation of theirs outlives them
        self.reset()

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded so far (the hooks stay)."""
        self._pending.clear()
        self._workspace.rewind()
        self._moments = ([ChannelMoments() for _ in self.taps], [ChannelMoments() for _ in self.taps])
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
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stash.clear()
        self._workspace.release()
        self._state.restore()

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _register(self) -> None:
        modules = dict(self.model.named_modules())
        consumers: dict[Site, list[Consumer]] = {}

        def add(site: Site, fn: Consumer) -> None:
            if site.module not in modules:
                raise SppError(f"tap site {site} names no module of {type(self.model).__name__}")
            consumers.setdefault(site, []).append(fn)

        for i, tap in enumerate(self.taps):
            add(tap.output, self._updater(0, i, tap.channel_dim))
            if isinstance(tap.residual, Site):
                branch_dim = tap.channel_dim if tap.residual_channel_dim is None else tap.residual_channel_dim
                add(tap.residual, self._updater(1, i, branch_dim))
            elif isinstance(tap.residual, Difference):
                add(tap.residual.subtrahend, self._stasher(tap.residual.subtrahend))
                add(tap.residual.minuend, self._differ(i, tap.residual.subtrahend, tap.channel_dim))

        for site, fns in consumers.items():
            module = modules[site.module]
            if site.kind == "input":
                hook = _pre_hook(fns, _argument(module, site.arg))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(_post_hook(fns)))
        self._handles.append(self.model.register_forward_pre_hook(self._count_batch, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))

    def _updater(self, which: int, i: int, channel_dim: int | None) -> Consumer:
        pending, ws = self._pending, self._workspace

        def update(x: torch.Tensor) -> None:
            pending.append((which, i, *batch_moments(x, channel_axis(x, channel_dim), ws)))

        return update

    def _stasher(self, site: Site) -> Consumer:
        stash = self._stash

        def keep(x: torch.Tensor) -> None:
            # A copy: a block that adds in place (x += f(x)) would otherwise overwrite the shortcut we subtract.
            stash[site] = x.clone()

        return keep

    def _differ(self, i: int, site: Site, channel_dim: int | None) -> Consumer:
        stash, pending, ws = self._stash, self._pending, self._workspace

        def differ(x: torch.Tensor) -> None:
            shortcut = stash.pop(site, None)
            if shortcut is not None and shortcut.shape == x.shape:
                branch = x - shortcut
                pending.append((1, i, *batch_moments(branch, channel_axis(branch, channel_dim), ws)))

        return differ

    def _count_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward() != -1:
            return  # a checkpointed model recomputed in backward: the same batch again
        x = _first_tensor(args) if args else _first_tensor(kwargs)
        self.samples += int(x.shape[0]) if x is not None and x.ndim else 0
        self.batches += 1

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._stash.clear()
        self._flush()

    def _flush(self) -> None:
        """Merge the moments of every tensor hooked since the last flush, in the order they were seen."""
        if not self._pending:
            return
        pending, lists = list(self._pending), self._moments
        self._pending.clear()
        items: list[MergeItem] = [(lists[which][i], n, mean, m2) for which, i, n, mean, m2 in pending]
        merge_many(items)
        self._workspace.rewind()  # the merged results were copied into the running moments

    # ---- results -----------------------------------------------------------------------------------------------
    def moments(self) -> list[tuple[ChannelMoments, ChannelMoments]]:
        """The raw per-channel moments, (output, residual) per tap, e.g. to merge across processes."""
        return list(zip(self.outputs, self.residuals, strict=True))

    def snapshot(self) -> Record:
        """The Record of everything seen since the last ``reset``; the moments move to the host once, here."""
        summaries = summarize([*self.outputs, *self.residuals])
        n = len(self.taps)
        rows = []
        for i, (tap, o, r) in enumerate(zip(self.taps, summaries[:n], summaries[n:], strict=True)):
            note = tap.note
            if tap.residual is not None and r.count and r.avg_var == 0.0 and r.avg_sq_mean == 0.0:
                note = note or "residual branch is exactly zero (zero-init gain?): a flat SPP is the truth here"
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
                "channels": o.channels,
                "count": o.count,
                "nonfinite": o.nonfinite_channels + r.nonfinite_channels,
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


def _graph_task_id() -> int:
    return -1


# -1 outside a backward pass; an activation-checkpointing recompute runs the forward inside one, and must not count.
_in_backward = getattr(torch._C, "_current_graph_task_id", _graph_task_id)


def _pre_hook(fns: list[Consumer], read: Callable[[tuple, dict], Any] | None = None) -> Callable[..., None]:
    """A forward pre-hook handing one input argument (detached) to every consumer of its site."""
    read = read or (lambda args, kwargs: args[0] if args else _first_tensor(kwargs))

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = read(args, kwargs)
        if isinstance(x, torch.Tensor) and _in_backward() == -1:
            x = x.detach()
            for f in fns:
                f(x)

    return hook


def _post_hook(fns: list[Consumer]) -> Callable[..., None]:
    """A forward hook handing the module's output (its first tensor, detached) to every consumer of its site."""
    if len(fns) == 1:
        fn = fns[0]

        def hook1(module: nn.Module, args: tuple, output: Any) -> None:
            x = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if x is not None and _in_backward() == -1:
                fn(x.detach())

        return hook1

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        if x is not None and _in_backward() == -1:
            x = x.detach()
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
    channel_dim: int | None = None,
    taps: Sequence[Tap] | None = None,
    settings: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    distributed: bool = False,
) -> Record:
    """Run ``model`` on ``inputs`` (one micro-batch, or an iterable of them) and return its SPP Record.

    A micro-batch is a tensor (the model's first argument), a dict of keyword arguments (``{"inputs_embeds": x}``)
    or a tuple of arguments. ``mode="train"`` normalises BatchNorm with each micro-batch's statistics (as at the
    start of training) with dropout off (``stochastic=True`` keeps dropout and drop-path live); ``"eval"`` uses
    the running statistics. Either way the model's state_dict, training flags, attributes and hooks are exactly as
    before afterwards, also when the forward raises. Micro-batches merge exactly (Chan et al.), so statistics over k
    micro-batches equal those over their concatenation wherever the model has no batch-dependent layers.
    ``on_batch(samples_in_batch)`` is called after each micro-batch (progress bars).

    ``distributed=True``: every rank of the initialised default process group calls ``record`` with its own
    micro-batches (possibly none); the moments are merged across ranks (``spp.distributed.merge_moments``) and
    every rank returns the Record over all ranks' samples.
    """
    check_record_call(on_batch=on_batch, distributed=distributed, settings=settings)
    batches = _micro_batches(inputs)
    recorder = SignalRecorder(
        model, rules=rules, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim, taps=taps, mode=mode,
        stochastic=stochastic, settings={"mode": mode, "stochastic": bool(stochastic), **(settings or {})},
    )
    batch_stats = mode == "train" and any(uses_batch_statistics(m) for m in model.modules())
    with recorder, torch.no_grad():
        for j, batch in enumerate(batches):
            size = batch_size_of(batch)
            if batch_stats and size == 1:
                raise SppError(
                    f"micro-batch {j} has batch size 1 and the model has BatchNorm in train mode, which would "
                    "normalise the sample on its own; give micro-batches of 2 or more samples, or use mode='eval'"
                )
            call_model(model, batch)
            if on_batch is not None:
                on_batch(size)
    if distributed:
        from spp.distributed import merge_moments

        merge_moments(recorder)
    if recorder.batches == 0:
        raise SppError("no input batches: nothing was recorded")
    return recorder.snapshot()

"""Record a model's Signal Propagation Plot with forward hooks.

    import spp.hooks
    rec = spp.hooks.record(model, torch.randn(8, 3, 224, 224))      # one call, model left exactly as it was
    with spp.hooks.SignalRecorder(model) as recorder:                # or: call the model yourself, as often as you like
        model(x)
    recorder.snapshot().to_frame()

Hooks keep no activation: each tap folds its tensor into per-channel moments (``spp.moments``) and lets it go.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from spp.discovery import find_taps, stage_ends
from spp.errors import SppError
from spp.moments import (
    ChannelMoments,
    Sums,
    Workspace,
    batch_moments,
    channel_axis,
    finalize_many,
    merge_many,
)
from spp.record import Record
from spp.taps import Difference, Site, Tap

Mode = Literal["train", "eval"]
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


class _ModelState:
    """Saves what recording may disturb (training flags, buffers, BN tracking) and puts it back bitwise."""

    def __init__(self, model: nn.Module, mode: Mode | None) -> None:
        if mode not in (None, "train", "eval"):
            raise SppError(f"mode must be 'train' or 'eval', not {mode!r}")
        self.model, self.mode = model, mode
        self.flags: list[tuple[nn.Module, bool]] = []
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self.tracking: list[tuple[nn.Module, bool]] = []

    def apply(self) -> None:
        if self.mode is None:
            return
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.buffers = [
            (m, n, b, b.detach().clone())
            for m in self.model.modules()
            for n, b in m._buffers.items()
            if b is not None
        ]
        self.model.train(self.mode == "train")
        if self.mode == "train":
            # Batch statistics, as at the start of training, without touching running_mean/var/num_batches_tracked.
            for m in self.model.modules():
                if isinstance(m, _BATCHNORMS):
                    self.tracking.append((m, m.track_running_stats))
                    m.track_running_stats = False

    def restore(self) -> None:
        for m, tracking in self.tracking:
            m.track_running_stats = tracking
        with torch.no_grad():
            for m, n, original, saved in self.buffers:
                m._buffers[n] = original
                if not torch.equal(original, saved):
                    original.copy_(saved)
        for m, training in self.flags:
            m.training = training
        self.flags, self.buffers, self.tracking = [], [], []


class SignalRecorder:
    """Context manager that hooks a model's residual blocks and streams their SPP statistics.

    ``mode=None`` (default) leaves the model as it is, for use inside a training loop; ``"train"`` or ``"eval"``
    sets it for the duration and restores flags and buffers (bitwise) on exit, also when the forward raises.
    Hooks are always removed on exit. ``snapshot()`` returns the Record so far; ``reset()`` starts a new one.

    Cost per hooked tensor: per-channel sums and sums of squares (CPU, where precise enough: ``channel_sums``) or
    an exact two-pass mean / M2 (``channel_stats``) on its device, no
    host sync, no autograd graph, no copy kept. The C-sized Chan merges of all taps run batched once per forward
    (a hook on the model itself), or at ``snapshot()``/``moments()`` when the blocks are called some other way.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        blocks: Sequence[str] | None = None,
        residual_tap: str | None = None,
        channel_dim: int | None = None,
        taps: Sequence[Tap] | None = None,
        mode: Mode | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.taps: list[Tap] = list(taps) if taps is not None else find_taps(
            model, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim
        )
        self.settings = dict(settings or {})
        self._state = _ModelState(model, mode)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stash: dict[Site, torch.Tensor] = {}
        # (0 = output / 1 = residual, tap index, n, mean, m2) or (..., n, Sums, None) per hooked tensor, for _flush
        self._pending: list[tuple[int, int, int, torch.Tensor | Sums, torch.Tensor | None]] = []
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
        consumers: dict[Site, list[Callable[[torch.Tensor], None]]] = {}

        def add(site: Site, fn: Callable[[torch.Tensor], None]) -> None:
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
                self._handles.append(module.register_forward_pre_hook(_pre_hook(fns), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(_post_hook(fns)))
        self._handles.append(self.model.register_forward_pre_hook(self._count_batch, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))

    def _updater(self, which: int, i: int, channel_dim: int | None) -> Callable[[torch.Tensor], None]:
        pending, ws = self._pending, self._workspace

        def update(x: torch.Tensor) -> None:
            pending.append((which, i, *batch_moments(x, channel_axis(x, channel_dim), ws)))

        return update

    def _stasher(self, site: Site) -> Callable[[torch.Tensor], None]:
        stash = self._stash

        def keep(x: torch.Tensor) -> None:
            # A copy: a block that adds in place (x += f(x)) would otherwise overwrite the shortcut we subtract.
            stash[site] = x.clone()

        return keep

    def _differ(self, i: int, site: Site, channel_dim: int | None) -> Callable[[torch.Tensor], None]:
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
        merge_many([(lists[which][i], n, mean, m2) for which, i, n, mean, m2 in pending])
        self._workspace.rewind()  # the merged results were copied into the running moments

    # ---- results -----------------------------------------------------------------------------------------------
    def moments(self) -> list[tuple[ChannelMoments, ChannelMoments]]:
        """The raw per-channel moments, (output, residual) per tap, e.g. to merge across processes."""
        return list(zip(self.outputs, self.residuals, strict=True))

    def snapshot(self) -> Record:
        """The Record of everything seen since the last ``reset``; the moments move to the host once, here."""
        summaries = finalize_many([*self.outputs, *self.residuals])
        n = len(self.taps)
        rows = []
        for i, (tap, o, r) in enumerate(zip(self.taps, summaries[:n], summaries[n:], strict=True)):
            nonfinite = o.nonfinite_channels + r.nonfinite_channels
            note = tap.note
            if tap.residual is not None and r.count and r.avg_var == 0.0 and r.avg_sq_mean == 0.0:
                note = note or "residual branch is exactly zero (zero-init gain?): a flat SPP is the truth here"
            rows.append(
                {
                    "block": i,
                    "name": tap.name,
                    "stage": tap.stage,
                    "avg_sq_mean": o.avg_sq_mean,
                    "avg_var": o.avg_var,
                    "res_avg_var": r.avg_var if tap.residual is not None else float("nan"),
                    "expected_var": float(tap.expected_var) if tap.expected_var is not None else float("nan"),
                    "channels": o.channels,
                    "count": o.count,
                    "nonfinite": nonfinite,
                    "module": tap.module,
                    "output_site": str(tap.output),
                    "residual_site": str(tap.residual) if tap.residual is not None else "",
                    "rule": tap.rule,
                    "note": note,
                }
            )
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


def _pre_hook(fns: list[Callable[[torch.Tensor], None]]):
    if len(fns) == 1:
        fn = fns[0]

        def hook1(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args) if args else _first_tensor(kwargs)
            if x is not None and _in_backward() == -1:
                fn(x.detach())

        return hook1

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args) if args else _first_tensor(kwargs)
        if x is not None and _in_backward() == -1:
            x = x.detach()
            for f in fns:
                f(x)

    return hook


def _post_hook(fns: list[Callable[[torch.Tensor], None]]):
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


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORMS) for m in model.modules())


def record(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    mode: Mode = "train",
    blocks: Sequence[str] | None = None,
    residual_tap: str | None = None,
    channel_dim: int | None = None,
    taps: Sequence[Tap] | None = None,
    settings: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    distributed: bool = False,
) -> Record:
    """Run ``model`` on ``inputs`` (one tensor, or an iterable of micro-batches) and return its SPP Record.

    ``mode="train"`` normalises BatchNorm with each micro-batch's statistics (as at the start of training);
    ``"eval"`` uses the running statistics. Either way the model's state_dict, training flags and hooks are
    exactly as before afterwards, also when the forward raises. Micro-batches merge exactly (Chan et al.), so
    statistics over k micro-batches equal those over their concatenation wherever the model has no batch-dependent
    layers. ``on_batch(samples_in_batch)`` is called after each micro-batch (progress bars).

    ``distributed=True``: every rank of the initialised default process group calls ``record`` with its own
    micro-batches (possibly none); the moments are merged across ranks (``spp.distributed.merge_moments``) and
    every rank returns the Record over all ranks' samples.
    """
    batches = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    check_bn = mode == "train" and _has_batchnorm(model)
    recorder = SignalRecorder(
        model, blocks=blocks, residual_tap=residual_tap, channel_dim=channel_dim, taps=taps, mode=mode,
        settings={"mode": mode, **(settings or {})},
    )
    with recorder, torch.no_grad():
        for batch in batches:
            if check_bn and isinstance(batch, torch.Tensor) and batch.shape[0] == 1:
                raise SppError(
                    "batch size 1 with BatchNorm in train mode: each sample would be normalised on its own; "
                    "use --batch-size 2 or more, or --mode eval"
                )
            model(batch)
            if on_batch is not None:
                on_batch(int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1)
    if distributed:
        from spp.distributed import merge_moments

        merge_moments(recorder)
    if recorder.batches == 0:
        raise SppError("no input batches: nothing was recorded")
    return recorder.snapshot()

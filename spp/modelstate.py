"""What recording may disturb in a user's model, saved before and put back after, also when the forward raises.

Recording sets the model's mode for the run:

* ``"train"``: normalisation layers that use batch statistics (BatchNorm and anything else that keeps
  ``running_mean`` / ``running_var``) normalise with each micro-batch's statistics, as at the start of training,
  without updating their running buffers. Everything else is in eval mode, so dropout, drop-path and stochastic
  depth are off and the SPP is deterministic ("train" means batch statistics, not randomness).
* ``"eval"``: every module in eval mode (running statistics).
* ``stochastic=True``: dropout and friends stay live (every module in train mode; BN as above).
* ``None``: the model is left as it is (a recorder inside the user's own training loop).

Afterwards the model is as before: every module's ``training`` flag, BN's ``track_running_stats``, every buffer
(bitwise; a buffer the forward replaced gets its old tensor back), and the plain Python attributes of modules whose
forward is not torch's own (a forward that counts its calls in ``self.calls`` changes nothing visible). torch's
multi-head-attention fast path is switched off for the run, because it bypasses the submodules spp hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from spp.errors import SppError

Mode = Literal["train", "eval"]
MODES: tuple[str, ...] = ("train", "eval")
_NORM_BASE = nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm* (their running buffers)


def check_mode(mode: object) -> Mode | None:
    """``mode`` itself when it is one spp knows (or None), else a one-line error."""
    if mode is not None and mode not in MODES:
        raise SppError(f"mode must be 'train' or 'eval', not {mode!r}")
    return mode  # type: ignore[return-value]


def normalises_with_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises with the statistics of its input in train mode and with running ones in eval
    mode (BatchNorm, InstanceNorm with running stats, anything keeping ``running_mean`` / ``running_var``)."""
    return isinstance(module, _NORM_BASE) or module._buffers.get("running_var") is not None \
        or module._buffers.get("running_mean") is not None


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` in train mode normalises each sample with statistics taken over the whole micro-batch
    (BatchNorm; not InstanceNorm, whose statistics are per sample), so a micro-batch of one sample is meaningless."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return False
    return normalises_with_running_statistics(module)


def _torch_own(module: nn.Module) -> bool:
    """Whether ``module``'s forward is torch's own code (which touches no Python attribute)."""
    return type(module).forward.__module__.startswith("torch.nn.")


class _Buffers:
    """Every buffer of a model, copied in one flat tensor per (device, dtype); restored where it changed."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.entries: list[tuple[nn.Module, str, torch.Tensor, int | None]] = []
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for m in modules:
            for n, b in m._buffers.items():
                if b is None or b.is_meta:
                    continue
                self.entries.append((m, n, b, _version(b)))
                groups.setdefault((b.device, b.dtype), []).append(b)
        self.copies: dict[int, torch.Tensor] = {}
        for tensors in groups.values():
            with torch.no_grad(), torch.inference_mode(False):
                flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                self.copies[id(t)] = part

    def restore(self) -> None:
        with torch.no_grad():
            for m, n, original, version in self.entries:
                m._buffers[n] = original  # a forward that assigned a new tensor: the old one comes back
                if version is None or _version(original) != version:
                    saved = self.copies[id(original)].view_as(original)
                    if not torch.equal(original, saved):
                        original.copy_(saved)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None where torch keeps none: inference tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


_MISSING = object()


class _Attributes:
    """The plain Python attributes of modules whose forward is not torch's own; restored by identity."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.saved = [(m, dict(vars(m))) for m in modules if not _torch_own(m)]

    def restore(self) -> None:
        for m, before in self.saved:
            now = vars(m)
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


@contextlib.contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Run code that may execute ``module``'s forward outside a recording (discovery traces it symbolically) and
    put back every attribute and buffer it touched."""
    modules = list(module.modules())
    attributes, buffers = _Attributes(modules), _Buffers(modules)
    try:
        yield
    finally:
        attributes.restore()
        buffers.restore()


class ModelState:
    """Sets a model's mode for a recording and puts everything back after (see the module docstring)."""

    def __init__(self, model: nn.Module, mode: Mode | None, *, stochastic: bool = False) -> None:
        self.model, self.mode, self.stochastic = model, check_mode(mode), bool(stochastic)
        self._saved: list[Any] | None = None

    def __enter__(self) -> ModelState:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def apply(self) -> None:
        """Save what the run may change, then set the mode."""
        if self.mode is None:
            return
        modules = list(self.model.modules())
        flags = [(m, m.training) for m in modules]
        tracking = [(m, m.track_running_stats) for m in modules if isinstance(m, _NORM_BASE)]
        attributes = _Attributes(modules)
        buffers = _Buffers(modules)
        fastpath = _mha_fastpath(False)
        self._saved = [flags, tracking, attributes, buffers, fastpath]
        train = self.mode == "train"
        for m in modules:
            m.training = train and (self.stochastic or normalises_with_running_statistics(m))
        if train:  # batch statistics without touching running_mean / running_var / num_batches_tracked
            for m, _ in tracking:
                m.track_running_stats = False

    def restore(self) -> None:
        """Put back everything ``apply`` saved (a no-op when nothing was saved)."""
        if self._saved is None:
            return
        flags, tracking, attributes, buffers, fastpath = self._saved
        self._saved = None
        _mha_fastpath(fastpath)
        for m, track in tracking:
            m.track_running_stats = track
        attributes.restore()
        buffers.restore()
        for m, training in flags:
            m.training = training


def _mha_fastpath(enabled: bool) -> bool:
    """Switch torch's fused multi-head-attention fast path; returns the previous setting."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        return enabled
    before = bool(mha.get_fastpath_enabled())
    mha.set_fastpath_enabled(enabled)
    return before

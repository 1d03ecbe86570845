"""BatchNorm under the microscope (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the library of ``spp bn``.

* ``precise_bn_stats``: PreciseBN. The model runs in train mode on many micro-batches (every BatchNorm normalises
  with its micro-batch's statistics, as in training; the running buffers are not touched), and each BN layer's
  input is folded into exact per-channel moments (``spp.moments``: per micro-batch count / mean / M2, merged with
  Chan's update in float64): the population mean and variance over all samples, every sample weighted equally.
  Not an average of per-batch variances, which misses the spread of the batch means.
* ``ema_discrepancy``: how far the EMA buffers (running_mean / running_var) are from those population statistics,
  per layer (median and worst channel), worst layer first.
* ``precise_state_dict``: the model's state_dict with the precise statistics in the running buffers (a copy).
* ``train_test_spp``: the SPP of the same inputs with (a) mini-batch statistics (train mode), (b) population
  statistics (eval mode with the precise buffers), (c) the EMA buffers (eval mode), and how far they diverge.
* ``batch_size_sweep``: the mini-batch SPP and the mini-batch statistics' distance from the population statistics
  at several normalisation batch sizes over the same samples.
* ``sync_batchnorm``: BatchNorm -> SyncBatchNorm for the duration of a run under torch.distributed.

Every function leaves the model exactly as it was: training flags, ``track_running_stats``, buffers (bitwise) and
modules are restored, also when the forward raises. Only BatchNorm layers (``nn.modules.batchnorm._BatchNorm``:
BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm) are analysed; GroupNorm / LayerNorm / InstanceNorm have no batch
statistics. Stochastic layers (dropout, drop path) run as in training during the train-mode runs, so the precise
statistics are those BatchNorm sees in training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spp.errors import SppError
from spp.modelstate import ModelState
from spp.moments import ChannelMoments, channel_stats
from spp.records import Record

_BatchNorm = nn.modules.batchnorm._BatchNorm

# ---- which layers, and keeping the model as it was -------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, module) of every BatchNorm layer, in ``named_modules`` order; a one-line error if none."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not layers:
        raise SppError(f"{type(model).__name__} has no BatchNorm layer: there are no batch statistics to analyse")
    return layers


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """Train mode as spp means it (``spp.modelstate``): BN normalises with each micro-batch's statistics without
    writing its running buffers, dropout is off; everything restored bitwise afterwards."""
    with ModelState(model, "train"):
        yield


def _input_tensor(batch: Any) -> torch.Tensor:
    """A micro-batch: a tensor, or a (tensor, target, ...) tuple / list as a DataLoader yields it."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise SppError(f"a micro-batch must be a tensor or a (tensor, ...) tuple, not {type(batch).__name__}")
    if batch.ndim == 0 or batch.shape[0] < 2:
        raise SppError(
            f"micro-batch of {batch.shape[0] if batch.ndim else 0} sample(s): train-mode BatchNorm needs at least 2 "
            "per micro-batch (each sample would be normalised on its own); use --batch-size 2 or more"
        )
    return batch


def _as_batches(inputs: torch.Tensor | Iterable[Any], *, allow_empty: bool = False) -> list[torch.Tensor]:
    """One tensor (one micro-batch) or an iterable of micro-batches, as a list (the runs go over them more than
    once). ``allow_empty``: a rank of a distributed run may have none."""
    items = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not items and not allow_empty:
        raise SppError("no input batches: nothing to measure")
    return [_input_tensor(b) for b in items]


# ---- collecting BN inputs ---------------------------------------------------------------------------------------


class _BNInputs:
    """Forward pre-hooks on every BatchNorm layer: per layer, the exact per-channel moments of its input, merged
    over all calls (Chan), and optionally each call's own (n, mean, M2) (float64, CPU) for the batch-size sweep."""

    def __init__(self, model: nn.Module, *, keep_batches: bool = False) -> None:
        self.model = model
        self.keep_batches = keep_batches
        self.names = [name for name, _ in batchnorm_layers(model)]
        self.moments = {name: ChannelMoments() for name in self.names}
        self.batches: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {n: [] for n in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _BNInputs:
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        moments, kept = self.moments[name], self.batches[name]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if x.numel() == 0:
                return
            n, mean, m2 = channel_stats(x, 1)  # exact two-pass, on x's device
            moments.add(n, mean, m2)
            if self.keep_batches:
                kept.append((n, mean.double().cpu(), m2.double().cpu()))

        return hook


# ---- PreciseBN ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStats:
    """One BatchNorm layer's input over all samples: ``count`` values per channel (N * H * W), the exact mean and
    the population variance (ddof 0), float64 on the CPU."""

    name: str
    count: int
    mean: torch.Tensor
    var: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.mean.numel())


@dataclass(frozen=True)
class PreciseStats:
    """Population statistics of every BatchNorm layer's input (``layers``, by qualified name, in module order).

    ``unused``: BN layers the forward never called (no statistics; ``precise_state_dict`` leaves them as they
    are). ``untracked``: BN layers built with ``track_running_stats=False``: no running buffers, so they normalise
    with batch statistics in eval mode too and have no EMA to compare.
    """

    layers: dict[str, LayerStats]
    samples: int
    batches: int
    unused: tuple[str, ...] = ()
    untracked: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)


def precise_bn_stats(
    model: nn.Module,
    batches: torch.Tensor | Iterable[Any],
    *,
    distributed: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> PreciseStats:
    """PreciseBN: the exact population mean and variance of every BatchNorm layer's input over all ``batches``.

    The model runs in train mode, so every BN normalises with its own micro-batch's statistics exactly as in
    training and the activations downstream are the training-time ones; ``track_running_stats`` is off for the
    run, so running_mean / running_var / num_batches_tracked are not written; flags and buffers are restored
    bitwise afterwards, also when the forward raises. ``batches``: one tensor or an iterable of micro-batches
    (tensors, or (tensor, target, ...) tuples, e.g. a DataLoader: streamed, not held), at least 2 samples each.

    Variance convention: ``var`` is the population variance (ddof 0) of the layer's input over all N*H*W values.
    A train-mode BN divides by its micro-batch's ddof-0 variance; the population variance is the limit of that
    as the micro-batch grows to the whole data, i.e. what eval mode should divide by. PyTorch's EMA stores the
    unbiased micro-batch variance, n_b/(n_b - 1) times the ddof-0 one, because on iid values the micro-batch
    variance is low by a factor (1 - 1/n_b); both estimate the same population variance. On the precise side the
    count is N*H*W, so n/(n - 1) would move the value by less than float32 resolution of the buffer for any
    realistic N; we keep the exact ddof-0 value. (On conv features the values within a sample are correlated,
    so the micro-batch variance is low by more than 1/n_b and the EMA's correction falls short: a bias PreciseBN
    does not have.)

    ``distributed=True``: every rank of the initialised process group calls this with its own micro-batches; the
    per-layer moments are merged across ranks (Chan, rank order) and every rank returns the statistics over all
    ranks' samples. Under ``sync_batchnorm`` every rank must run the same number of micro-batches.
    """
    items: Iterable[Any] = [batches] if isinstance(batches, torch.Tensor) else batches
    syncing = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if distributed and syncing:
        items = list(items)
        _check_same_batch_count(len(items))
    untracked = tuple(name for name, m in batchnorm_layers(model) if m.running_mean is None)
    samples = count = 0
    with _BNInputs(model) as inputs, _train_mode(model), torch.no_grad():
        for item in items:  # streamed: a DataLoader's batches are not all held at once
            batch = _input_tensor(item)
            model(batch)
            samples += int(batch.shape[0])
            count += 1
            if on_batch is not None:
                on_batch(int(batch.shape[0]))
    if distributed:  # a rank may have had no micro-batch; the merge gives it everyone's
        samples, count = _merge_across_ranks(list(inputs.moments.values()), samples, count)
    if count == 0:
        raise SppError("no input batches: nothing to measure")
    layers, unused = {}, []
    for name in inputs.names:
        m = inputs.moments[name]
        if m.count == 0 or m.mean is None or m.m2 is None:
            unused.append(name)
            continue
        mean = m.mean.detach().double().cpu()
        layers[name] = LayerStats(name, m.count, mean, m.m2.detach().double().cpu() / m.count)
    return PreciseStats(layers, samples, count, tuple(unused), untracked)


def _merge_across_ranks(moments: list[ChannelMoments], samples: int, batches: int) -> tuple[int, int]:
    """All-gather and merge the layers' moments across ranks in place (``spp.distributed.merge_across_ranks``)."""
    from spp.distributed import merge_across_ranks

    return merge_across_ranks(moments, samples, batches)


def _check_same_batch_count(count: int) -> None:
    """SyncBatchNorm is a collective in every forward: ranks with different micro-batch counts would hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    if len(set(counts)) > 1:
        raise SppError(f"SyncBatchNorm needs the same number of micro-batches on every rank, got {counts}; "
                       "pick --num-samples a multiple of batch size x world size")


# ---- EMA versus precise ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDiscrepancy:
    """How far one layer's EMA buffers are from the precise population statistics, over its channels.

    mean error of channel c: |running_mean_c - mu_c| / sqrt(var_c + eps): the shift the EMA's mean error puts on
    the layer's eval-mode output, in units of that output's standard deviation (a plain relative error explodes
    for means near 0). var error: |(running_var_c + eps) / (var_c + eps) - 1|: the relative error of what eval
    mode divides by (its output is off by the square root of that ratio); finite for dead channels (var 0).
    """

    layer: str
    channels: int
    mean_err_median: float
    mean_err_max: float
    mean_err_channel: int  # the worst channel
    var_err_median: float
    var_err_max: float
    var_err_channel: int
    num_batches_tracked: int  # EMA updates the buffers have seen (-1 where the layer does not count them)
    momentum: float | None

    @property
    def worst(self) -> float:
        return max(self.mean_err_max, self.var_err_max)


def _matched_layers(model: nn.Module, stats: PreciseStats) -> list[tuple[LayerStats, _BatchNorm]]:
    """(statistics, BN module) per layer of ``stats``; a one-line error where the model does not match them."""
    modules = dict(model.named_modules())
    out = []
    for name, layer in stats.layers.items():
        bn = modules.get(name)
        if not isinstance(bn, _BatchNorm):
            raise SppError(f"the precise statistics name BatchNorm layer {name!r}, which this model does not have: "
                           "were they measured on another model?")
        if bn.num_features != layer.channels:
            raise SppError(f"BatchNorm layer {name!r} has {bn.num_features} channels, its precise statistics "
                           f"{layer.channels}: were they measured on another model?")
        out.append((layer, bn))
    return out


def relative_errors(
    mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (float64): |mean - ref_mean| / sqrt(ref_var + eps) and |(var + eps) / (ref_var + eps) - 1|."""
    mean, var, ref_mean, ref_var = (t.detach().double().cpu() for t in (mean, var, ref_mean, ref_var))
    return (mean - ref_mean).abs() / (ref_var + eps).sqrt(), ((var + eps) / (ref_var + eps) - 1).abs()


def ema_discrepancy(model: nn.Module, stats: PreciseStats) -> list[LayerDiscrepancy]:
    """Per BN layer with running buffers, the EMA buffers' error against ``stats`` (median and worst channel),
    sorted worst layer first (by the larger of the worst mean and worst variance error)."""
    rows = []
    for layer, bn in _matched_layers(model, stats):
        if bn.running_mean is None or bn.running_var is None:
            continue
        mean_err, var_err = relative_errors(bn.running_mean, bn.running_var, layer.mean, layer.var, bn.eps)
        tracked = bn.num_batches_tracked
        rows.append(LayerDiscrepancy(
            layer=layer.name,
            channels=layer.channels,
            mean_err_median=float(mean_err.median()),
            mean_err_max=float(mean_err.max()),
            mean_err_channel=int(mean_err.argmax()),
            var_err_median=float(var_err.median()),
            var_err_max=float(var_err.max()),
            var_err_channel=int(var_err.argmax()),
            num_batches_tracked=int(tracked) if tracked is not None else -1,
            momentum=bn.momentum,
        ))
    return sorted(rows, key=lambda r: r.worst, reverse=True)


def to_frame(rows: Sequence[Any]):
    """A pandas DataFrame of a list of this module's dataclasses (one column per field)."""
    import dataclasses

    import pandas as pd

    return pd.DataFrame([dataclasses.asdict(r) for r in rows])


def precise_state_dict(model: nn.Module, stats: PreciseStats) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` whose BN running_mean / running_var hold the precise statistics (in the
    buffers' dtype and device; num_batches_tracked as it was). Plain tensors: ``torch.save`` it and read it back
    with ``torch.load(..., weights_only=True)`` and ``load_state_dict``. The model is not touched."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for layer, _ in _matched_layers(model, stats):
        prefix = f"{layer.name}." if layer.name else ""
        mean_key, var_key = f"{prefix}running_mean", f"{prefix}running_var"
        if mean_key not in state:
            continue  # a layer without running buffers
        state[mean_key] = layer.mean.to(state[mean_key].dtype).to(state[mean_key].device)
        state[var_key] = layer.var.to(state[var_key].dtype).to(state[var_key].device)
    return state


@contextlib.contextmanager
def precise_buffers(model: nn.Module, stats: PreciseStats) -> Iterator[nn.Module]:
    """The model with the precise statistics copied into its BN running buffers for the duration; the original
    buffers come back bitwise afterwards, also on exceptions."""
    matched = _matched_layers(model, stats)
    saved = []
    try:
        with torch.no_grad():
            for layer, bn in matched:
                if bn.running_mean is None or bn.running_var is None:
                    continue
                saved.append((bn.running_mean, bn.running_mean.clone()))
                saved.append((bn.running_var, bn.running_var.clone()))
                bn.running_mean.copy_(layer.mean)
                bn.running_var.copy_(layer.var)
        yield model
    finally:
        with torch.no_grad():
            for buffer, original in saved:
                buffer.copy_(original)


# ---- train / test SPP -----------------------------------------------------------------------------------------

SPP_COLUMNS = ("avg_var", "res_avg_var")
MODES = ("minibatch", "precise", "ema")


@dataclass(frozen=True)
class TrainTestSpp:
    """The SPP of the same inputs three ways: ``minibatch`` (train mode: each BN uses its micro-batch's
    statistics), ``precise`` (eval mode, population statistics in the buffers), ``ema`` (eval mode, the model's
    own EMA buffers)."""

    minibatch: Record
    precise: Record
    ema: Record

    def divergence(self) -> list[dict[str, Any]]:
        """Per block: |log10(a / b)| of avg_var and res_avg_var for each pair of the three (NaN where undefined:
        the stem's residual, a zero variance). 0.3 is a factor of 2."""
        out = []
        for ra, rb, rc in zip(self.minibatch.rows, self.precise.rows, self.ema.rows, strict=True):
            row: dict[str, Any] = {"block": ra["block"], "name": ra["name"], "stage": ra["stage"]}
            recs = {"minibatch": ra, "precise": rb, "ema": rc}
            for key in SPP_COLUMNS:
                for x, y in (("minibatch", "precise"), ("minibatch", "ema"), ("precise", "ema")):
                    row[f"{key}:{x}/{y}"] = _log_ratio(recs[x][key], recs[y][key])
            out.append(row)
        return out

    def divergence_frame(self):
        import pandas as pd

        return pd.DataFrame(self.divergence())


def _log_ratio(a: float, b: float) -> float:
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    return abs(math.log10(a / b))


def train_test_spp(
    model: nn.Module,
    batches: torch.Tensor | Iterable[Any],
    stats: PreciseStats | None = None,
    **record_kwargs: Any,
) -> TrainTestSpp:
    """Record the SPP of ``batches`` with mini-batch, population (precise) and EMA statistics.

    ``stats``: precise statistics to use (default: ``precise_bn_stats(model, batches)``, the population of these
    same inputs). ``record_kwargs`` go to ``spp.hooks.record`` (taps, blocks, distributed, ...). The eval-mode
    runs differ from the train-mode one in everything train / eval changes (dropout too), not only in BN.
    """
    import spp.hooks

    distributed = bool(record_kwargs.get("distributed"))
    items = _as_batches(batches, allow_empty=distributed)
    if stats is None:
        stats = precise_bn_stats(model, items, distributed=distributed)
    minibatch = spp.hooks.record(model, items, mode="train", **record_kwargs)
    with precise_buffers(model, stats):
        precise = spp.hooks.record(model, items, mode="eval", **record_kwargs)
    ema = spp.hooks.record(model, items, mode="eval", **record_kwargs)
    return TrainTestSpp(minibatch, precise, ema)


# ---- normalisation batch size ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBatchError:
    """One BN layer at one normalisation batch size: how far each micro-batch's statistics (what train mode
    normalises with: mean and ddof-0 variance) are from the population statistics of the same run (the Chan
    merge of all its micro-batches), averaged over channels and micro-batches. Errors as in ``LayerDiscrepancy``;
    ``var_bias``: the signed mean of (var_B + eps) / (var + eps) - 1 (negative: micro-batch variances run low;
    -1/n for n iid values per channel)."""

    batch_size: int
    layer: str
    mean_err: float
    var_err: float
    var_bias: float


@dataclass(frozen=True)
class BatchSizeResult:
    """The mini-batch SPP (train mode) at one normalisation batch size and its BN layers' batch errors.
    ``samples``: the first floor(N / batch_size) * batch_size samples (a last, smaller micro-batch would have
    another normalisation batch size). ``population``: where precise statistics were given, the eval-mode SPP
    of the same samples with them in the buffers (the test-time view of the same inputs), else None."""

    batch_size: int
    samples: int
    record: Record
    layers: list[LayerBatchError]
    population: Record | None = None

    @property
    def mean_var_err(self) -> float:
        return sum(r.var_err for r in self.layers) / len(self.layers)

    @property
    def max_var_err(self) -> float:
        return max(r.var_err for r in self.layers)

    @property
    def spp_divergence(self) -> float:
        """Max over blocks of |log10| of the mini-batch SPP's avg_var over the population SPP's (NaN without
        ``population``): the train/test inconsistency this batch size puts into the signal."""
        if self.population is None:
            return float("nan")
        ratios = [_log_ratio(a["avg_var"], b["avg_var"])
                  for a, b in zip(self.record.rows, self.population.rows, strict=True)]
        finite = [r for r in ratios if r == r]
        return max(finite) if finite else float("nan")


def batch_size_sweep(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_sizes: Sequence[int] = (2, 4, 8, 32),
    stats: PreciseStats | None = None,
    **record_kwargs: Any,
) -> list[BatchSizeResult]:
    """For each normalisation batch size b, split the same samples ``inputs`` (N, ...) into micro-batches of b,
    record the train-mode SPP and each BN layer's mini-batch statistics against the population statistics of
    that run. The population is taken at the same b because BN layers downstream of the first see inputs that
    depend on b (their upstream BNs normalise with b-sample statistics): it is what PreciseBN at batch size b
    would give. ``stats`` (e.g. ``precise_bn_stats`` at the training batch size): also record the eval-mode SPP
    of the same samples with them (``BatchSizeResult.population``, ``spp_divergence``). Single-process (per
    rank)."""
    import spp.hooks

    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
        raise SppError("batch_size_sweep needs the samples as one tensor (N, ...)")
    total = int(inputs.shape[0])
    results = []
    for b in batch_sizes:
        if b < 2 or b > total:
            raise SppError(f"batch size {b}: needs 2 <= batch size <= the {total} samples")
        used = total // b * b
        micro = list(inputs[:used].split(b))
        with _BNInputs(model, keep_batches=True) as bn_inputs:
            rec = spp.hooks.record(model, micro, mode="train", **record_kwargs)
        layers = []
        modules = dict(model.named_modules())
        for name in bn_inputs.names:
            m, per_batch = bn_inputs.moments[name], bn_inputs.batches[name]
            if m.count == 0 or m.mean is None or m.m2 is None:
                continue
            mean, var = m.mean.double().cpu(), m.m2.double().cpu() / m.count
            eps = modules[name].eps
            errs = [relative_errors(bm, bm2 / n, mean, var, eps) for n, bm, bm2 in per_batch]
            bias = [((bm2 / n + eps) / (var + eps) - 1).mean() for n, _, bm2 in per_batch]
            layers.append(LayerBatchError(
                batch_size=b,
                layer=name,
                mean_err=float(torch.stack([e[0].mean() for e in errs]).mean()),
                var_err=float(torch.stack([e[1].mean() for e in errs]).mean()),
                var_bias=float(torch.stack(bias).mean()),
            ))
        population = None
        if stats is not None:  # the same micro-batches in eval mode
            with precise_buffers(model, stats):
                population = spp.hooks.record(model, micro, mode="eval", **record_kwargs)
        results.append(BatchSizeResult(b, used, rec, layers, population))
    return results


# ---- SyncBatchNorm --------------------------------------------------------------------------------------------


class _SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, plus a forward-only path for CPU tensors (gloo), which torch's refuses.

    On CPU in train mode under an initialised group of more than one rank: every rank's per-channel (count, mean,
    M2) of its micro-batch is all-gathered in float64 and merged (Chan): the statistics of the concatenation of all
    ranks' micro-batches, with which the input is normalised (and the running buffers updated where tracked:
    unbiased variance, as PyTorch). No gradient flows through the gathered statistics, so it refuses to run with
    autograd on; spp's diagnostics run under ``torch.no_grad``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        syncing = self.training and dist.is_available() and dist.is_initialized()
        if input.device.type != "cpu" or not syncing:
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        world = dist.get_world_size(group)
        if world == 1:
            return super().forward(input)
        if torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise SppError("SyncBatchNorm on CPU tensors runs forward only here (torch's needs a GPU to train); "
                           "run under torch.no_grad()")
        self._check_input_dim(input)
        channels = input.shape[1]
        if input.numel():
            n, mean, m2 = channel_stats(input, 1)
        else:
            n, mean, m2 = 0, torch.zeros(channels), torch.zeros(channels)
        local = torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean.double(), m2.double()])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        counts, means, m2s = table[:, 0], table[:, 1 : 1 + channels], table[:, 1 + channels :]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over all ranks")
        g_mean = (counts[:, None] * means).sum(0) / total
        g_var = (m2s.sum(0) + (counts[:, None] * (means - g_mean) ** 2).sum(0)) / total
        tracked = self.num_batches_tracked
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None \
                and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - factor).add_(g_mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = g_var * total / (total - 1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        # eval-mode batch_norm with the merged statistics is exactly the normalisation by them
        return torch.nn.functional.batch_norm(input, g_mean.to(input.dtype), g_var.to(input.dtype), self.weight,
                                              self.bias, False, 0.0, self.eps)


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module, process_group: Any = None) -> Iterator[int]:
    """Every BatchNorm of ``model`` becomes a SyncBatchNorm (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
    sharing the original's parameters and buffers) for the duration; the original modules are put back afterwards,
    also on exceptions. Yields the number of layers converted: 0 without an initialised process group of more
    than one rank (SyncBN over one process is BN: nothing to do).

    The model's own SyncBatchNorm layers stay, with the CPU path added for the duration (and are counted).
    In train mode each BN then normalises with the statistics of all ranks' current micro-batches together, as
    SyncBN training does; every rank must run the same number of forwards (each is a collective). On CPU tensors
    (gloo) a forward-only path does the synchronisation (torch's SyncBatchNorm supports GPUs only).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        yield 0
        return
    if isinstance(model, _BatchNorm):
        raise SppError("the model is itself a BatchNorm layer: wrap it in a module to convert it")
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    converted: dict[int, nn.Module] = {}
    recast = [m for m in model.modules() if type(m) is nn.SyncBatchNorm]  # the model's own: CPU path added
    try:
        for m in recast:
            m.__class__ = _SyncBatchNorm
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    sync = converted.get(id(child))
                    if sync is None:
                        sync = nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group)
                        sync.__class__ = _SyncBatchNorm  # same object layout: adds only the CPU forward
                        converted[id(child)] = sync
                    swaps.append((parent, child_name, child))
                    setattr(parent, child_name, sync)
        yield len(converted) + len(recast)
    finally:
        for parent, child_name, child in reversed(swaps):
            setattr(parent, child_name, child)
        for m in recast:
            m.__class__ = nn.SyncBatchNorm

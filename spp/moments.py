"""Per-channel count / mean / M2, streamed over micro-batches and merged exactly (Chan et al., 1979).

A forward hook hands an activation to ``channel_stats``: a two-pass mean / M2 over the non-channel axes in
float32 or better (the activation's own dtype when it is float64), computed on the activation's device with no
host sync. Those per-batch moments merge into running ones in float64 (float32 on MPS) with Chan's update, one
tap at a time (``ChannelMoments.update``/``merge``) or many taps at once (``merge_many``, what the recorder does
after each forward). Nothing is copied to the host until ``finalize``; ``state``/``from_state`` hand the moments
to ``torch.save`` or to ``torch.distributed`` collectives (``spp.distributed``).

Why two passes and not sum / sum of squares: the variance from sum-of-squares cancels catastrophically when a
channel's mean is large against its spread (a mean-shifted net, the very thing an SPP shows), and a shift does
not help unless it is subtracted before squaring, which costs the same activation-sized temporary as the second
pass. On CPU the reductions are laid out by shape (a contiguous (outer, C, inner) view, summed over its longer
axis first), which is several times faster than one reduction over non-adjacent axes when the spatial extent
is small; ``torch.var_mean`` (Welford) is 10-50x slower there. On CUDA one fused ``var_mean`` kernel is best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Inner (spatial) extents at least this long are summed first; shorter ones after the batch axis (CPU only).
_INNER_FIRST = 32
# Tensors above _CHUNK_MIN elements take their squared deviations in pieces of about _CHUNK elements (CPU).
_CHUNK_MIN = 1 << 20
_CHUNK = 1 << 18
# Inner extents this short (but > 1) use torch.batch_norm_update_stats (CPU only).
_BN_INNER = 4


def channel_axis(x: torch.Tensor, channel_dim: int | None) -> int:
    """The channel axis of ``x``: explicit, or 1 for (B, C), (B, C, H, W), (B, C, D, H, W); -1 for tokens (B, N, C)."""
    if channel_dim is not None:
        return channel_dim % x.ndim
    if x.ndim == 3:
        return 2
    if x.ndim < 2:
        raise ValueError(f"cannot take channel statistics of a tensor of shape {tuple(x.shape)}")
    return 1


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it cheaply (CPU, CUDA); float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sum_rows(v: torch.Tensor, outer: int, channels: int, inner: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of a contiguous (outer, C, inner) tensor over its outer and inner axes -> (C,) (into ``out``)."""
    if inner == 1:
        rows, dim = v.view(outer, channels), 0
    elif outer == 1:
        rows, dim = v.view(channels, inner), 1
    elif inner >= _INNER_FIRST:
        rows, dim = v.view(outer, channels, inner).sum(2), 0
    else:
        rows, dim = v.view(outer, channels * inner).sum(0).view(channels, inner), 1
    return rows.sum(dim) if out is None else torch.sum(rows, dim, out=out)


class Workspace:
    """Memory a recorder reuses on every hook (CPU): one buffer for the squared deviations (at most
    ``_CHUNK_MIN`` elements) and one arena for the per-batch (mean, M2) vectors waiting for the end-of-forward
    merge. Hooks then allocate nothing that outlives them: small result tensors kept alive between the model's
    large activations otherwise fragment glibc's heap, and a forward's peak RSS grows by 100+ MiB on a
    600-layer model.
    """

    __slots__ = ("_arena", "_high", "_scratch", "_used")

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None
        self._arena: dict[torch.dtype, torch.Tensor] = {}
        self._used: dict[torch.dtype, int] = {}
        self._high: dict[torch.dtype, int] = {}

    def squared(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped and typed like ``like`` (contents undefined), a view of the scratch buffer."""
        b, numel = self._scratch, like.numel()
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            with torch.inference_mode(False):  # a normal tensor: usable as out= in and out of inference mode
                b = self._scratch = torch.empty(max(numel, b.numel() if b is not None else 0), dtype=like.dtype,
                                                device=like.device)
        return b[:numel].view(like.shape)

    def results(self, channels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fresh C-vectors (mean, M2) carved from the arena, valid until ``rewind``."""
        used = self._used.get(dtype, 0)
        block = self._arena.get(dtype)
        if block is None or used + 2 * channels > block.numel():
            with torch.inference_mode(False):
                size = max(1 << 16, 2 * (block.numel() if block is not None else 0), 2 * channels)
                block = self._arena[dtype] = torch.empty(size, dtype=dtype, device="cpu")
            self._high[dtype] = self._high.get(dtype, 0) + used
            used = 0
        self._used[dtype] = used + 2 * channels
        return block[used : used + channels], block[used + channels : used + 2 * channels]

    def rewind(self) -> None:
        """Every result handed out has been merged: reuse the arena from its start (one block, large enough)."""
        for dtype, block in list(self._arena.items()):
            need = self._high.get(dtype, 0) + self._used.get(dtype, 0)
            if need > block.numel():
                with torch.inference_mode(False):
                    self._arena[dtype] = torch.empty(need + need // 4, dtype=dtype, device="cpu")
        self._used.clear()
        self._high.clear()

    def release(self) -> None:
        self._scratch = None
        self._arena.clear()
        self._used.clear()
        self._high.clear()


def channel_stats(
    x: torch.Tensor, axis: int, workspace: Workspace | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(values per channel, per-channel mean, per-channel M2 = sum of squared deviations) of ``x`` along ``axis``.

    Mean and M2 are 1-D, on ``x``'s device, in float32 (float64 for float64 input; half / bfloat16 / integer
    input is widened to float32 first). Exact two-pass; ``x`` is not modified and is never copied to the host.
    ``workspace`` (CPU): reused memory for the squared deviations and the results, which are then only valid
    until its next ``rewind``.
    """
    if x.dtype is not torch.float32 and x.dtype is not torch.float64:
        x = x.float()
    shape = x.shape
    channels = shape[axis]
    n = x.numel() // channels if channels else 0
    if n == 0:
        raise ValueError(f"cannot take channel statistics of an empty tensor of shape {tuple(shape)}")
    if x.device.type == "cuda":
        dims = [d for d in range(x.ndim) if d != axis]
        var, mean = torch.var_mean(x, dim=dims, correction=0)  # one fused Welford kernel
        return n, mean, var * n
    outer = math.prod(shape[:axis])
    inner = n // outer
    if not x.is_contiguous():
        if axis == 1 and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(0, 2, 3, 1)  # a view: NHWC in memory
            outer, inner = n, 1
        elif axis == 1 and x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.permute(0, 2, 3, 4, 1)
            outer, inner = n, 1
        else:
            x = x.contiguous()
    cpu = x.device.type == "cpu"
    ws = workspace if cpu else None
    mean_out, m2_out = ws.results(channels, x.dtype) if ws is not None else (None, None)
    if 1 < inner <= _BN_INNER and outer > 1 and cpu:
        # Tiny spatial extent (a last stage at low resolution): BatchNorm's own stats kernel, two passes with
        # double accumulation in one call, beats six small kernels. Not for inner == 1, where it sums in float.
        mean, var = torch.batch_norm_update_stats(x.view(outer, channels, inner), None, None, 0.0)
        if mean_out is None:
            return n, mean, var * n
        return n, mean_out.copy_(mean), torch.mul(var, n, out=m2_out)
    mean = _sum_rows(x, outer, channels, inner, mean_out).div_(n)
    v = x.view(outer, channels, inner)
    if v.numel() <= _CHUNK_MIN:
        sq_dev = _squared_deviations(v, mean.view(1, channels, 1), ws)
        return n, mean, _sum_rows(sq_dev, outer, channels, inner, m2_out)
    return n, mean, _chunked_m2(v, mean, ws, m2_out)


def _squared_deviations(v: torch.Tensor, centre: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """(v - centre)^2 for a (outer, C, inner) ``v`` and a broadcastable ``centre``: a new tensor, or scratch."""
    out = ws.squared(v) if ws is not None else None
    if v.shape[-1] >= _INNER_FIRST:
        # One elementwise pass (mse_loss without reduction is bitwise (v - centre).square_()).
        return _squared_difference(v, centre.expand_as(v), out)
    # Short rows: mse_loss's broadcast is slow there, sub + in-place square is not.
    return (torch.sub(v, centre) if out is None else torch.sub(v, centre, out=out)).square_()


def _chunked_m2(v: torch.Tensor, mean: torch.Tensor, ws: Workspace | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """M2 of a large contiguous (outer, C, inner) tensor, its squared deviations made one cache-sized piece at a
    time: no activation-sized temporary (page faults, memory traffic), the same sums."""
    outer, channels, inner = v.shape
    m2 = out.zero_() if out is not None else torch.zeros(channels, dtype=v.dtype, device=v.device)
    row = channels * inner
    if row <= 4 * _CHUNK:
        step = max(1, _CHUNK // row)
        centre = mean.view(1, channels, 1)
        for o in range(0, outer, step):
            part = v[o : o + step]
            sq_dev = _squared_deviations(part, centre, ws)
            m2.add_(_sum_rows(sq_dev, part.shape[0], channels, inner))
        return m2
    step = max(1, _CHUNK // inner)  # one sample alone is large: split its channels too
    for o in range(outer):
        for c in range(0, channels, step):
            part = v[o, c : c + step]
            sq_dev = _squared_deviations(part, mean[c : c + step, None], ws)
            m2[c : c + step] += sq_dev.sum(1)
    return m2


try:
    from torch._C._nn import mse_loss as _mse_loss

    def _squared_difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _mse_loss(a, b, 0) if out is None else _mse_loss(a, b, 0, out=out)  # 0 = reduction "none"

except ImportError:  # pragma: no cover - private binding moved: the public functional does the same

    def _squared_difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d = torch.nn.functional.mse_loss(a, b, reduction="none")
        return d if out is None else out.copy_(d)


class ChannelMoments:
    """Running per-channel moments of one tap. ``count`` is a Python int, so updates never sync with the device.

    ``mean`` and ``m2`` are owned by this object and updated in place.
    """

    __slots__ = ("count", "m2", "mean")

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, channel_dim: int | None = None) -> None:
        """Fold a tensor in: statistics over every axis but the channel axis."""
        n, mean, m2 = channel_stats(x, channel_axis(x, channel_dim))
        self.add(n, mean, m2)

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold in the moments of ``n`` more values per channel (e.g. from ``channel_stats``)."""
        if n <= 0:
            return
        with torch.inference_mode(False):  # running moments stay normal tensors, updatable in any mode
            self._add(n, mean, m2)

    def _add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            acc = accumulation_dtype(mean.device)
            self.count, self.mean, self.m2 = n, _owned(mean, acc), _owned(m2, acc)
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"channel count changed between batches: {self.mean.shape[0]} then {mean.shape[0]}")
        w_mean, w_m2 = _weights(self.count, n)
        mean = mean.to(self.mean.device, self.mean.dtype)
        delta = mean - self.mean
        self.m2.add_(m2.to(self.m2.device, self.m2.dtype)).addcmul_(delta, delta, value=w_m2)
        self.mean.add_(delta.mul_(w_mean))
        self.count += n

    def merge(self, other: ChannelMoments) -> None:
        """Fold in another tap's moments (other micro-batches, another process); ``other`` is left unchanged."""
        if other.count:
            self.add(other.count, other.mean, other.m2)

    def finalize(self) -> Summary:
        """Move to the host once and reduce to the SPP scalars."""
        if self.count == 0:
            return Summary(0, float("nan"), float("nan"), 0, 0)
        # to the host first, then float64: MPS has no float64
        return _summary(self.count, self.mean.detach().cpu().double(), self.m2.detach().cpu().double())

    def state(self) -> dict:
        """Plain tensors for saving or for ``torch.distributed`` collectives (copies: safe to keep)."""
        return {
            "count": self.count,
            "mean": None if self.mean is None else self.mean.clone(),
            "m2": None if self.m2 is None else self.m2.clone(),
        }

    @classmethod
    def from_state(cls, state: dict) -> ChannelMoments:
        m = cls()
        count = int(state["count"])
        if count:
            m.add(count, state["mean"], state["m2"])
        return m


def _summary(count: int, mean: torch.Tensor, m2: torch.Tensor) -> Summary:
    var = m2 / count
    nonfinite = int((~torch.isfinite(mean) | ~torch.isfinite(var)).sum())
    return Summary(
        count=count,
        avg_sq_mean=float((mean * mean).mean()),
        avg_var=float(var.mean()),
        channels=int(mean.numel()),
        nonfinite_channels=nonfinite,
    )


def finalize_many(moments: Sequence[ChannelMoments]) -> list[Summary]:
    """``finalize`` of each, with one device-to-host copy per device and a few vectorised reductions on the host
    (segment sums over channels) instead of ~10 small ops per tap."""
    out: list[Summary | None] = [None] * len(moments)
    by_device: dict[torch.device, list[int]] = {}
    for k, m in enumerate(moments):
        if m.count == 0:
            out[k] = Summary(0, float("nan"), float("nan"), 0, 0)
        else:
            by_device.setdefault(m.mean.device, []).append(k)
    for ks in by_device.values():
        sizes = [moments[k].mean.numel() for k in ks]
        flat = torch.cat([moments[k].mean.detach().reshape(-1) for k in ks]
                         + [moments[k].m2.detach().reshape(-1) for k in ks]).cpu().double()  # MPS: no float64
        total = sum(sizes)
        mean, m2 = flat[:total], flat[total:]
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(len(ks)), sizes_t)
        counts = torch.tensor([moments[k].count for k in ks], dtype=torch.float64)
        var = m2 / counts[seg]
        zeros = torch.zeros(len(ks), dtype=torch.float64)
        avg_sq = (zeros.index_add(0, seg, mean * mean) / sizes_t).tolist()
        avg_var = (zeros.index_add(0, seg, var) / sizes_t).tolist()
        bad = (~torch.isfinite(mean) | ~torch.isfinite(var)).to(torch.int64)
        nonfinite = torch.zeros(len(ks), dtype=torch.int64).index_add(0, seg, bad).tolist()
        for j, k in enumerate(ks):
            out[k] = Summary(moments[k].count, avg_sq[j], avg_var[j], sizes[j], nonfinite[j])
    return out  # type: ignore[return-value]


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` as a tensor nobody else holds (a copy unless ``.to`` made one)."""
    out = t.detach().to(dtype)
    return out.clone() if out is t or out.data_ptr() == t.data_ptr() else out


def _weights(n_a: int, n_b: int) -> tuple[float, float]:
    """Chan's weights for merging n_b values into n_a: n_b / n for the mean, n_a * n_b / n for M2."""
    n = n_a + n_b
    return n_b / n, n_a * n_b / n


def merge_many(items: Sequence[tuple[ChannelMoments, int, torch.Tensor, torch.Tensor]]) -> None:
    """Fold per-batch ``(moments, n, mean, m2)`` into their moments, in order, with a handful of foreach ops.

    The same as ``moments.add(n, mean, m2)`` for each item in turn (a ChannelMoments may appear more than once,
    e.g. a module called twice in a forward), but the C-sized merges of all taps run as a few batched kernels
    instead of ~6 ops per tap. The per-batch moments are taken over (not copied again) where they already have
    the accumulation dtype.
    """
    items = [it for it in items if it[1] > 0]
    with torch.inference_mode(False):  # running moments stay normal tensors, updatable in any mode
        _merge_all(items)


def _merge_all(items: list[tuple[ChannelMoments, int, torch.Tensor, torch.Tensor]]) -> None:
    while items:
        seen: set[int] = set()
        now, later = [], []
        for it in items:
            (later if id(it[0]) in seen else now).append(it)
            seen.add(id(it[0]))
        _merge_distinct(now)
        items = later


def _merge_distinct(items: list[tuple[ChannelMoments, int, torch.Tensor, torch.Tensor]]) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list] = {}
    fresh: dict[torch.device, list] = {}
    for it in items:
        m, n, mean, m2 = it
        if m.count == 0:
            fresh.setdefault(mean.device, []).append(it)
        elif mean.shape != m.mean.shape:
            raise ValueError(f"channel count changed between batches: {m.mean.shape[0]} then {mean.shape[0]}")
        else:
            groups.setdefault((m.mean.device, m.mean.dtype), []).append(it)
    for device, group in fresh.items():
        acc = accumulation_dtype(device)
        if len(group) < 4:
            for m, n, mean, m2 in group:
                m.count, m.mean, m.m2 = n, _owned(mean, acc), _owned(m2, acc)
            continue
        # First batch of many taps: one new buffer (torch.cat always copies), each tap owning a disjoint slice.
        sizes = [it[2].numel() for it in group]
        flat = torch.cat([it[2].reshape(-1) for it in group] + [it[3].reshape(-1) for it in group]).to(acc)
        parts = flat.split(sizes + sizes)
        for j, (m, n, mean, _) in enumerate(group):
            m.count, m.mean, m.m2 = n, parts[j].view(mean.shape), parts[len(group) + j].view(mean.shape)
    for (device, dtype), group in groups.items():
        if len(group) < 4:
            for m, n, mean, m2 in group:
                m._add(n, mean, m2)
            continue
        sizes = [it[2].numel() for it in group]
        means_b = torch.cat([it[2].reshape(-1) for it in group]).to(device, dtype).split(sizes)
        m2s_b = torch.cat([it[3].reshape(-1) for it in group]).to(device, dtype).split(sizes)
        weights = [_weights(it[0].count, it[1]) for it in group]
        means = [it[0].mean for it in group]
        m2s = [it[0].m2 for it in group]
        delta = torch._foreach_sub(means_b, means)
        torch._foreach_add_(m2s, m2s_b)
        torch._foreach_addcmul_(m2s, delta, delta, [w for _, w in weights])
        torch._foreach_mul_(delta, [w for w, _ in weights])
        torch._foreach_add_(means, delta)
        for it in group:
            it[0].count += it[1]


@dataclass(frozen=True)
class Summary:
    count: int  # values per channel
    avg_sq_mean: float
    avg_var: float
    channels: int
    nonfinite_channels: int

"""Per-channel count / mean / M2, streamed over micro-batches and merged exactly (Chan et al., 1979).

A forward hook hands an activation to ``batch_moments``: its per-channel moments over the non-channel axes in
float32 or better (the activation's own dtype when it is float64), computed on the activation's device with no
host sync. Those per-batch moments merge into running ones in float64 (float32 on MPS) with Chan's update, one
tap at a time (``ChannelMoments.add``/``merge``) or many taps at once (``merge_many``, what the recorder does
after each forward); both are the same batched update. Nothing is copied to the host until ``summarize`` (or
``ChannelMoments.summary``), which reduces any number of taps with one device-to-host copy.

Two ways to a tensor's moments on CPU, chosen per tensor:

* ``channel_sums`` (the recorder's fast path): per-row sums and sums of squares in float32, two read-only passes
  (``sum`` and ``linalg.vector_norm``; a multiply into reused scratch where rows are short), reduced to float64
  mean / M2 for all taps at once after the forward. M2 = Q - S^2/n cancels when a channel's mean is large against
  its spread, so a guard (a dot product and a sum over channels) refuses the tensor when the M2 its sums imply is
  below 1/``_KAPPA`` of its sum of squares: the relative error of the average variance then stays below
  ``_KAPPA`` times float32's summation error, and refused tensors take the exact path. Measured against
  float64: ~2e-7 on centred data; at the guard's limit up to 1.2e-5 for one channel's variance, 5e-7 for the
  channel average.
* ``channel_stats`` (exact, two-pass): the mean, then the squared deviations from it, summed. Used for everything
  the fast path refuses (mean-shifted nets: the very thing an SPP shows), float64 input, CUDA (one fused
  ``var_mean`` kernel) and MPS. On CPU the reductions are laid out by shape (a contiguous (outer, C, inner) view,
  summed over its longer axis first), which is several times faster than one reduction over non-adjacent axes
  when the spatial extent is small; ``torch.var_mean`` (Welford) is 10-50x slower there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spp.errors import SppError

# Inner (spatial) extents at least this long are summed first; shorter ones after the batch axis (CPU only).
_INNER_FIRST = 32
# Tensors above _CHUNK_MIN elements take their squared deviations in pieces of about _CHUNK elements (CPU).
_CHUNK_MIN = 1 << 20
_CHUNK = 1 << 18
# Inner extents this short (but > 1) use torch.batch_norm_update_stats (CPU only).
_BN_INNER = 4
# The fast path (channel_sums): refuse a tensor whose implied M2 is below 1/_KAPPA of its sum of squares.
_KAPPA = 8.0
# Its rows (summed over the inner axes) are at most this long: vector_norm accumulates sequentially in float32,
# and its error grows with the row length (measured 3e-7 relative at 3136, 7e-7 at 12544).
_ROW_MAX = 8192
# Where the inner extent is short, it sums over at most this many leading rows (float32 matrix-vector products).
_COL_MAX = 256


def channel_axis(x: torch.Tensor, channel_dim: int | None) -> int:
    """The channel axis of ``x``: explicit, or 1 for (B, C), (B, C, H, W), (B, C, D, H, W); -1 for tokens (B, N, C).

    An explicit axis outside ``[-ndim, ndim)`` is an error, never wrapped: axis 7 of a 4-D tensor is a typo.
    """
    if channel_dim is not None:
        if not -x.ndim <= channel_dim < x.ndim:
            raise SppError(f"channel axis {channel_dim} does not exist in a tensor of shape {tuple(x.shape)} "
                           f"(valid: {-x.ndim} to {x.ndim - 1})")
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

    __slots__ = ("_arena", "_high", "_ones", "_scratch", "_used")

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None
        self._ones: dict[int, torch.Tensor] = {}
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

    def ones(self, size: int) -> torch.Tensor:
        """A float32 CPU vector of ones (matrix-vector products with it are fast sums)."""
        v = self._ones.get(size)
        if v is None:
            with torch.inference_mode(False):
                v = self._ones[size] = torch.ones(size)
        return v

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
        self._ones.clear()
        self._arena.clear()
        self._used.clear()
        self._high.clear()


@dataclass(frozen=True)
class Sums:
    """A tensor's per-channel sums ``s`` and sums of squares ``q`` (float32, (C,)) over ``n`` values per channel,
    not yet reduced to mean / M2: ``merge_many`` does that in float64 for every tap at once."""

    n: int
    s: torch.Tensor
    q: torch.Tensor


def channel_sums(x: torch.Tensor, axis: int, workspace: Workspace) -> Sums | None:
    """The fast CPU path: per-channel sums and sums of squares of a float32 ``x`` along ``axis``, or None where
    it does not apply (another device or dtype, an unusual layout) or would lose precision (the guard: see the
    module docstring); ``channel_stats`` is then the way. Where the inner (spatial) extent is long: row sums and
    row norms, two read-only passes; where it is short: a multiply into scratch, and matrix-vector products with
    ones for the sums (much faster than a reduction over short rows). The (C,) results live in ``workspace``
    until its next ``rewind``.
    """
    if x.dtype is not torch.float32 or x.device.type != "cpu":
        return None
    shape = x.shape
    channels = shape[axis]
    n = x.numel() // channels if channels else 0
    if n == 0:
        return None
    outer = math.prod(shape[:axis])
    inner = n // outer
    if not x.is_contiguous():
        if axis == 1 and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(0, 2, 3, 1)  # a view: NHWC in memory, the channel last
            outer, inner, shape = n, 1, x.shape
        else:
            return None
    length = inner
    if inner > _ROW_MAX:  # shorter rows: one per image row
        length = shape[-1]
        if x.ndim - 1 == axis or not 32 <= length <= _ROW_MAX:
            return None
    elif inner < 32 and outer > _COL_MAX:
        return None
    s_out, q_out = workspace.results(channels, torch.float32)
    if inner >= 32:
        rows = x.reshape(-1, length)  # a view (x is contiguous): (outer, C, inner / length) rows
        s = torch.sum(rows, 1)
        q = torch.linalg.vector_norm(rows, 2, 1).square_()
        if length == inner:  # (outer, C) row results: summing them over outer costs no precision
            torch.mv(s.view(outer, channels).t(), workspace.ones(outer), out=s_out)
            torch.mv(q.view(outer, channels).t(), workspace.ones(outer), out=q_out)
        else:
            torch.sum(s.view(outer, channels, -1), (0, 2), out=s_out)
            torch.sum(q.view(outer, channels, -1), (0, 2), out=q_out)
    else:
        cols = x.reshape(outer, channels * inner)
        squares = torch.mul(cols, cols, out=workspace.squared(cols))
        for values, out in ((cols, s_out), (squares, q_out)):
            if inner == 1:
                torch.mv(values.t(), workspace.ones(outer), out=out)
            else:
                column = torch.mv(values.t(), workspace.ones(outer))
                torch.mv(column.view(channels, inner), workspace.ones(inner), out=out)
    # Guard: the M2 the sums imply must be at least 1/_KAPPA of the sum of squares; NaN / inf go the exact way.
    total_q = float(q_out.sum())
    if not (math.isfinite(total_q) and float(torch.dot(s_out, s_out)) / n <= total_q * (1.0 - 1.0 / _KAPPA)):
        return None
    return Sums(n, s_out, q_out)


def batch_moments(
    x: torch.Tensor, axis: int, workspace: Workspace
) -> tuple[int, torch.Tensor | Sums, torch.Tensor | None]:
    """What a hook hands to ``merge_many``: ``(n, sums, None)`` from the fast path where it applies, else
    ``(n, mean, m2)`` from the exact one."""
    sums = channel_sums(x, axis, workspace)
    if sums is not None:
        return sums.n, sums, None
    return channel_stats(x, axis, workspace)


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
        # 0 = reduction "none"; the binding takes the enum's int (the stubs say str)
        return _mse_loss(a, b, 0) if out is None else _mse_loss(a, b, 0, out=out)  # type: ignore[arg-type, call-arg]

except ImportError:  # pragma: no cover - private binding moved: the public functional does the same

    def _squared_difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        d = torch.nn.functional.mse_loss(a, b, reduction="none")
        return d if out is None else out.copy_(d)


class ChannelMoments:
    """Running per-channel moments of one tap. ``count`` is a Python int, so updates never sync with the device.

    ``mean`` and ``m2`` are owned by this object and updated in place; every update goes through ``merge_many``.
    """

    __slots__ = ("count", "m2", "mean")

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, channel_dim: int | None = None) -> None:
        """Fold a tensor in: statistics over every axis but the channel axis (exact two-pass kernel)."""
        n, mean, m2 = channel_stats(x, channel_axis(x, channel_dim))
        self.add(n, mean, m2)

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold in the moments of ``n`` more values per channel (e.g. from ``channel_stats``)."""
        merge_many([(self, n, mean, m2)])

    def merge(self, other: ChannelMoments) -> None:
        """Fold in another tap's moments (other micro-batches, another process); ``other`` is left unchanged."""
        if other.count:
            assert other.mean is not None and other.m2 is not None
            self.add(other.count, other.mean, other.m2)

    def assign(self, other: ChannelMoments, device: torch.device | None = None) -> None:
        """Become ``other`` (its tensors moved to ``device`` when given): how a cross-process merge hands back."""
        self.count = other.count
        self.mean = None if other.mean is None else other.mean.to(device or other.mean.device)
        self.m2 = None if other.m2 is None else other.m2.to(device or other.m2.device)

    def summary(self) -> Summary:
        """The SPP scalars of this tap (one host copy)."""
        return summarize([self])[0]


def summarize(moments: Sequence[ChannelMoments]) -> list[Summary]:
    """The SPP scalars of each, with one device-to-host copy per device and a few vectorised reductions on the host
    (segment sums over channels) instead of ~10 small ops per tap."""
    out: list[Summary] = [Summary(0, math.nan, math.nan, 0, 0) for _ in moments]
    by_device: dict[torch.device, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for k, m in enumerate(moments):
        if m.count and m.mean is not None and m.m2 is not None:
            by_device.setdefault(m.mean.device, []).append((k, m.mean, m.m2))
    for found in by_device.values():
        ks = [k for k, _, _ in found]
        sizes = [mean.numel() for _, mean, _ in found]
        flat = torch.cat([mean.detach().reshape(-1) for _, mean, _ in found]
                         + [m2.detach().reshape(-1) for _, _, m2 in found]).cpu().double()  # MPS: no float64
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
    return out


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` as a tensor nobody else holds (a copy unless ``.to`` made one)."""
    out = t.detach().to(dtype)
    return out.clone() if out is t or out.data_ptr() == t.data_ptr() else out


def _weights(n_a: int, n_b: int) -> tuple[float, float]:
    """Chan's weights for merging n_b values into n_a: n_b / n for the mean, n_a * n_b / n for M2."""
    n = n_a + n_b
    return n_b / n, n_a * n_b / n


# (moments to update, n values per channel, per-batch mean or the Sums of channel_sums, per-batch M2 or None)
MergeItem = tuple[ChannelMoments, int, "torch.Tensor | Sums", "torch.Tensor | None"]
_Exact = tuple[ChannelMoments, int, torch.Tensor, torch.Tensor]


def merge_many(items: Sequence[MergeItem]) -> None:
    """Fold per-batch ``(moments, n, mean, m2)`` into their moments, in order: Chan's parallel update, batched.

    The one merge of spp: ``ChannelMoments.add`` calls it with one item, the recorder with every tensor of a forward,
    ``spp.distributed`` with every rank's moments. A ChannelMoments may appear more than once (a module called
    twice in a forward): its items are applied in order. The C-sized updates of all taps run as a few foreach
    kernels instead of ~6 ops per tap. Per-batch moments are taken over (not copied again) where they already have
    the accumulation dtype. An item may be ``(moments, n, sums, None)`` with the ``Sums`` of ``channel_sums``: those
    are reduced to float64 (mean, M2) first, all of them together.
    """
    live = [it for it in items if it[1] > 0]
    with torch.inference_mode(False):  # running moments stay normal tensors, updatable in any mode
        reduced = iter(_reduce_sums([it[2] for it in live if isinstance(it[2], Sums)]))
        exact: list[_Exact] = []
        for m, n, mean, m2 in live:
            if isinstance(mean, Sums):
                mean, m2 = next(reduced)
            assert m2 is not None
            exact.append((m, n, mean, m2))
        while exact:  # rounds in which each ChannelMoments appears at most once
            seen: set[int] = set()
            now: list[_Exact] = []
            later: list[_Exact] = []
            for it in exact:
                (later if id(it[0]) in seen else now).append(it)
                seen.add(id(it[0]))
            _merge_distinct(now)
            exact = later


def _reduce_sums(sums: list[Sums]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float64 (mean, M2) of each ``Sums``, computed for all of them together."""
    if not sums:
        return []
    sizes = [t.s.numel() for t in sums]
    s = torch.cat([t.s for t in sums]).double()
    q = torch.cat([t.q for t in sums]).double()
    counts = torch.tensor([t.n for t in sums], dtype=torch.float64).repeat_interleave(torch.tensor(sizes))
    mean = s.div_(counts)
    m2 = q.sub_(mean * mean * counts).clamp_min_(0.0)  # the guard bounds the cancellation; M2 >= 0 anyway
    return list(zip(mean.split(sizes), m2.split(sizes), strict=True))


def _gathered(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` on ``device`` in ``dtype``: one transfer for many (a cat, then views), a plain ``.to`` for few."""
    if len(tensors) < 4:
        return [t.to(device, dtype) for t in tensors]
    return list(torch.cat([t.reshape(-1) for t in tensors]).to(device, dtype).split([t.numel() for t in tensors]))


def _live(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None, "moments with a count have tensors"
    return t


def _merge_distinct(items: list[_Exact]) -> None:
    """Chan's update for items whose ChannelMoments are all different."""
    fresh: dict[torch.device, list[_Exact]] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[_Exact]] = {}
    for it in items:
        m, _, mean, _ = it
        if m.count == 0 or m.mean is None:
            fresh.setdefault(mean.device, []).append(it)
        elif mean.shape != m.mean.shape:
            raise ValueError(f"channel count changed between batches: {m.mean.shape[0]} then {mean.shape[0]}")
        else:
            groups.setdefault((m.mean.device, m.mean.dtype), []).append(it)
    for device, group in fresh.items():  # a first batch: take the moments over
        acc = accumulation_dtype(device)
        if len(group) < 4:
            for m, n, mean, m2 in group:
                m.count, m.mean, m.m2 = n, _owned(mean, acc), _owned(m2, acc)
            continue
        # Many taps: one new buffer (torch.cat always copies), each tap owning a disjoint slice of it.
        sizes = [it[2].numel() for it in group]
        flat = torch.cat([it[2].reshape(-1) for it in group] + [it[3].reshape(-1) for it in group]).to(acc)
        parts = flat.split(sizes + sizes)
        for j, (m, n, mean, _) in enumerate(group):
            m.count, m.mean, m.m2 = n, parts[j].view(mean.shape), parts[len(group) + j].view(mean.shape)
    for (device, dtype), group in groups.items():
        means_b = _gathered([it[2] for it in group], device, dtype)
        m2s_b = _gathered([it[3] for it in group], device, dtype)
        weights = [_weights(it[0].count, it[1]) for it in group]
        means = [_live(it[0].mean) for it in group]
        m2s = [_live(it[0].m2) for it in group]
        delta = list(torch._foreach_sub(means_b, means))
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

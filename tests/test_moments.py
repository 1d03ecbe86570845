"""The statistics kernels and the Chan merge: every path equals a float64 computation (ddof 0) on every layout
and dtype, k micro-batches equal one shot, and the fast path's guard refuses what would cancel.
"""

from __future__ import annotations

import pytest
import torch

from spp.moments import ChannelMoments, Sums, Workspace, channel_stats, channel_sums, merge_many, summarize
from tests.helpers import assert_close, direct_stats

CUDA = torch.cuda.is_available()

MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




def direct(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance in float64, the obvious way."""
    flat = x.detach().double().movedim(axis, 0).reshape(x.shape[axis], -1)
    mean = flat.mean(dim=1)
    return mean, ((flat - mean[:, None]) ** 2).mean(dim=1)


def check(x: torch.Tensor, axis: int, rel: float = 1e-5) -> None:
    n, mean, m2 = channel_stats(x, axis)
    ws = Workspace()  # the recorder's path: reused scratch and result memory, the same numbers
    n_ws, mean_ws, m2_ws = channel_stats(x, axis, ws)
    assert n_ws == n and torch.equal(mean_ws, mean) and torch.equal(m2_ws, m2)
    ref_mean, ref_var = direct(x, axis)
    assert n == x.numel() // x.shape[axis]
    assert mean.shape == m2.shape == (x.shape[axis],)
    assert mean.dtype in (torch.float32, torch.float64) and mean.device == x.device
    scale = ref_var.sqrt().clamp_min(1e-30)
    assert ((mean.double().cpu() - ref_mean).abs() / scale).max() < rel
    assert ((m2.double().cpu() / n - ref_var).abs() / ref_var).max() < rel


def shifted(shape, seed=0, dtype=torch.float32):
    """Channels with means up to 10 std: naive sum-of-squares would lose the variance here."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return (x * 0.5 + 5.0).to(dtype)


# ---- every kernel path equals float64 ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 16), (8, 16, 1, 1), (8, 16, 2, 2), (4, 16, 2, 1), (8, 32, 4, 4),
                                   (2, 8, 9, 9), (3, 4, 40, 40), (1, 8, 6, 6), (2, 3, 4, 5, 6),
                                   (4, 6, 300, 300), (1, 2, 800, 900), (64, 64, 16, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_channel_stats_every_shape(shape):
    check(shifted(shape), 1)


def test_channel_stats_tokens_and_other_axes():
    check(shifted((4, 197, 48)), 2)
    check(shifted((4, 12, 50)), 1)
    check(shifted((3, 5, 7, 6)), 3)
    check(shifted((3, 5, 7, 6)), 0)


def test_channel_stats_memory_layouts():
    x = shifted((4, 12, 10, 10))
    check(x.to(memory_format=torch.channels_last), 1)
    check(shifted((2, 6, 4, 5, 5)).to(memory_format=torch.channels_last_3d), 1)
    check(x.transpose(2, 3), 1)  # non-contiguous
    check(x[:, ::2], 1)  # strided channels
    check(shifted((3000, 5, 4))[::2], 1)  # a large strided view: copied, then chunked


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_channel_stats_dtypes(dtype):
    x = shifted((4, 8, 6, 6), dtype=dtype)
    mean = channel_stats(x, 1)[1]
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check(x, 1, rel=1e-12 if dtype == torch.float64 else 1e-5)  # low precision: exact stats of the values given
    xi = torch.randint(-5, 5, (4, 3, 5, 5))
    check(xi, 1)


def test_channel_stats_leave_input_alone():
    x = shifted((2, 4, 3000, 2))  # the chunked path
    before = x.clone()
    channel_stats(x, 1)
    assert torch.equal(x, before)


def test_micro_batches_equal_one_shot_on_every_path():
    for shape in [(12, 16, 2, 2), (12, 16, 8, 8), (12, 64, 40, 40), (12, 32)]:
        x = shifted(shape, seed=3)
        one = ChannelMoments()
        one.update(x)
        parts = ChannelMoments()
        for part in x.split([1, 4, 2, 5]):
            parts.update(part)
        a, b = one.summary(), parts.summary()
        assert a.count == b.count
        assert abs(a.avg_var - b.avg_var) <= 1e-6 * a.avg_var
        assert abs(a.avg_sq_mean - b.avg_sq_mean) <= 1e-6 * a.avg_sq_mean


def test_merge_many_equals_sequential_adds():
    g = torch.Generator().manual_seed(5)
    channels = [3, 5, 7, 2]
    order = [0, 1, 0, 2, 3, 1, 0, 3, 2, 0]  # taps repeat: merged in order
    merged, sequential, items = [ChannelMoments() for _ in channels], [ChannelMoments() for _ in channels], []
    for k, i in enumerate(order):
        n, mean, m2 = channel_stats(torch.randn(4, channels[i], 3, 3, generator=g) + k, 1)
        items.append((merged[i], n, mean, m2))
        sequential[i].add(n, mean, m2)
    merge_many(items)
    for a, b in zip(merged, sequential, strict=True):
        assert a.count == b.count
        assert torch.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.m2, b.m2, rtol=1e-12, atol=1e-12)
    for s, t in zip(summarize(merged), merged, strict=True):
        assert s.avg_var == pytest.approx(t.summary().avg_var, rel=1e-12)


# ---- the fast path: sums and sums of squares, refused where they would cancel -----------------------------------
def standardised(shape, mean: float, axis: int = 1, seed: int = 0) -> torch.Tensor:
    """float32 data whose every channel has (in float64) exactly this mean and variance 1: kappa = 1 + mean^2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).movedim(axis, 0)
    flat = x.reshape(x.shape[0], -1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, correction=0, keepdim=True)
    return (flat.reshape(x.shape) + mean).movedim(0, axis).float().contiguous()


def fast_moments(x: torch.Tensor, axis: int) -> tuple[Sums, ChannelMoments]:
    sums = channel_sums(x, axis, Workspace())
    assert sums is not None, f"fast path refused {tuple(x.shape)}"
    m = ChannelMoments()
    merge_many([(m, sums.n, sums, None)])
    return sums, m


@pytest.mark.parametrize("shape", [(8, 16, 16, 16), (4, 8, 8, 8), (2, 3, 40, 40), (1, 2, 100, 100), (8, 16, 4, 4),
                                   (8, 32, 2, 2), (16, 8, 1, 1), (8, 16), (3, 5, 6, 7, 8), (300, 4, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_channel_sums_equal_float64_where_they_apply(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5  # kappa ~ 1.1
    if shape == (300, 4, 3, 3):  # more leading rows than one matrix-vector product sums: the exact path
        assert channel_sums(x, 1, Workspace()) is None
        return
    sums, m = fast_moments(x, 1)
    ref_mean, ref_var = direct(x, 1)
    assert sums.n == m.count == x.numel() // x.shape[1]
    assert m.mean.dtype == torch.float64
    assert ((m.mean - ref_mean).abs() / ref_var.sqrt()).max() < 1e-6
    assert ((m.m2 / m.count - ref_var).abs() / ref_var).max() < 1e-5


def test_channel_sums_channels_last_equals_contiguous():
    x = torch.randn(4, 12, 6, 6, generator=torch.Generator().manual_seed(2))
    _, a = fast_moments(x, 1)
    _, b = fast_moments(x.to(memory_format=torch.channels_last), 1)
    ref_mean, ref_var = direct(x, 1)
    for m in (a, b):
        assert torch.allclose(m.mean, ref_mean, rtol=0, atol=1e-6)
        assert torch.allclose(m.m2 / m.count, ref_var, rtol=1e-5, atol=0)
    assert channel_sums(x.transpose(2, 3), 1, Workspace()) is None  # other strides: the exact path copies


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_channel_sums_guard_refuses_cancellation(layout):
    shape = (4, 6, 12, 12) if layout == "rows" else (16, 6, 2, 2)
    assert channel_sums(standardised(shape, mean=2.0), 1, Workspace()) is not None  # kappa 5 < 8
    assert channel_sums(standardised(shape, mean=3.0), 1, Workspace()) is None  # kappa 10 > 8
    assert channel_sums(standardised(shape, mean=0.0) * 1e-3 + 100.0, 1, Workspace()) is None  # kappa 1e10
    bad = torch.randn(shape)
    bad[0, 1, 0, 0] = float("nan")
    assert channel_sums(bad, 1, Workspace()) is None  # NaN: the exact path reports the channel
    bad[0, 1, 0, 0] = float("inf")
    assert channel_sums(bad, 1, Workspace()) is None
    assert channel_sums(torch.randn(shape, dtype=torch.float64), 1, Workspace()) is None  # float64: exact
    zeros = fast_moments(torch.zeros(shape), 1)[1]  # a dead layer: exactly zero, not refused
    assert torch.equal(zeros.m2, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(256, 32, 1, 1), (64, 16, 3, 3), (4, 8, 40, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_channel_sums_precision_at_the_guards_limit(shape):
    x = standardised(shape, mean=2.6, seed=4)  # kappa = 7.76, just inside the guard
    _, m = fast_moments(x, 1)
    _, ref_var = direct(x, 1)
    var = m.m2 / m.count
    assert ((var - ref_var).abs() / ref_var).max() < 3e-5  # one channel
    assert abs(var.mean() - ref_var.mean()) / ref_var.mean() < 1e-6  # the average spp reports


def test_merge_many_mixes_sums_and_exact_moments():
    g = torch.Generator().manual_seed(6)
    merged, sequential, items = ChannelMoments(), ChannelMoments(), []
    for k in range(5):
        x = torch.randn(4, 6, 8, 8, generator=g) + 0.1 * k
        if k % 2:
            n, mean, m2 = channel_stats(x, 1)
            items.append((merged, n, mean, m2))
        else:
            sums = channel_sums(x, 1, Workspace())
            items.append((merged, sums.n, sums, None))
        sequential.update(x)
    merge_many(items)
    assert merged.count == sequential.count
    assert torch.allclose(merged.mean, sequential.mean, rtol=0, atol=1e-6)
    assert torch.allclose(merged.m2, sequential.m2, rtol=1e-6, atol=0)


def test_merge_copies_and_leaves_the_source_alone():
    m = ChannelMoments()
    m.update(shifted((4, 3, 2, 2)))
    before = m.mean.clone(), m.m2.clone()
    copy = ChannelMoments()
    copy.merge(m)
    copy.update(shifted((4, 3, 2, 2), seed=1))
    assert m.count == 16 and copy.count == 32
    assert torch.equal(before[0], m.mean) and torch.equal(before[1], m.m2)  # the copy's update left m alone


# ---- CUDA (skipped without a GPU) -----------------------------------------------------------------------------
@needs_cuda
def test_cuda_channel_stats_equal_float64():
    for shape in [(8, 16, 2, 2), (8, 32, 20, 20), (4, 197, 48)]:
        x = shifted(shape).cuda()
        check(x, x.ndim - 1 if len(shape) == 3 else 1)
    check(shifted((4, 8, 6, 6), dtype=torch.bfloat16).cuda(), 1)



# ---- moments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dim", [((6, 5, 7, 3), 1), ((4, 9, 5), 2), ((10, 3), 1), ((4, 3, 4, 5, 6), 1)])
def test_moments_streamed_equal_one_shot_and_direct(shape, dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 5  # a large mean: the case where naive sum-of-squares cancels
    one = ChannelMoments()
    one.update(x, dim)
    streamed = ChannelMoments()
    for part in x.split([1, 2, x.shape[0] - 3]):
        streamed.update(part, dim)
    a, b = one.summary(), streamed.summary()
    assert a.count == b.count == x.numel() // x.shape[dim]
    assert_close(b.avg_var, a.avg_var, 1e-6, "var")
    assert_close(b.avg_sq_mean, a.avg_sq_mean, 1e-6, "sq mean")
    sq, var = direct_stats(x, dim)
    assert_close(a.avg_var, var, 1e-5, "var vs direct")
    assert_close(a.avg_sq_mean, sq, 1e-6, "sq mean vs direct")


def test_moments_merge_equals_update_over_both():
    x, y = torch.randn(5, 4, 3, 3), torch.randn(7, 4, 3, 3) + 2
    left, right, both = ChannelMoments(), ChannelMoments(), ChannelMoments()
    left.update(x)
    right.update(y)
    left.merge(right)
    both.update(torch.cat([x, y]))
    assert_close(left.summary().avg_var, both.summary().avg_var, 1e-6)
    assert torch.allclose(left.mean, both.mean, rtol=1e-6, atol=1e-7)


def test_moments_report_nonfinite_channels():
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("inf")
    m = ChannelMoments()
    m.update(x)
    assert m.summary().nonfinite_channels == 1


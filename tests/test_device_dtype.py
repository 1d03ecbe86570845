"""--device / --dtype, and the statistics kernels on every layout and dtype they take a fast path for.

The kernels (``spp.moments.channel_stats``) choose their reductions by shape; every path must equal a float64
direct computation (ddof 0), and k micro-batches must equal one shot. CUDA tests run only where CUDA is.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import spp.hooks
import spp.moments
from spp.cli import app
from spp.devices import resolve_device, resolve_dtype
from spp.errors import SppError
from spp.loading import LoadedModel
from spp.models import create_model
from spp.moments import ChannelMoments, Sums, Workspace, channel_stats, channel_sums, merge_many, summarize
from spp.run import RunConfig, record_run

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


def test_recorder_fast_path_equals_exact_path(monkeypatch):
    """The recorder's statistics with the fast path on equal those with it off (all exact) to 1e-6, and both
    paths ran: NF blocks are centred (fast), the ws=False ablation is mean-shifted (refused, exact)."""
    took = {"fast": 0, "refused": 0}
    real = spp.moments.channel_sums

    def counting(x, axis, ws):
        out = real(x, axis, ws)
        took["fast" if out is not None else "refused"] += 1
        return out

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for ws in (True, False):
        torch.manual_seed(0)
        model = create_model("nf_resnet50", width=0.125, ws=ws)
        monkeypatch.setattr(spp.moments, "channel_sums", counting)
        fast = spp.hooks.record(model, x.split(2))
        monkeypatch.setattr(spp.moments, "channel_sums", lambda x, axis, ws: None)
        exact = spp.hooks.record(model, x.split(2))
        for a, b in zip(fast.rows, exact.rows, strict=True):
            for key in ("avg_sq_mean", "avg_var", "res_avg_var"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, nan_ok=True), (a["name"], key)
    assert took["fast"] > 0 and took["refused"] > 0


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


def test_recorder_under_inference_mode_then_normal_mode():
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    x = torch.randn(2, 3, 32, 32)
    with spp.hooks.SignalRecorder(model, mode="eval") as rec:
        with torch.inference_mode():
            model(x)
        with torch.no_grad():
            model(x)
    one = spp.hooks.record(model, x, mode="eval")
    assert rec.snapshot().rows[-1]["avg_var"] == pytest.approx(one.rows[-1]["avg_var"], rel=1e-6)


def test_recorder_adds_no_autograd_graph():
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    x = torch.randn(2, 3, 32, 32)
    with spp.hooks.SignalRecorder(model, mode="eval") as rec:
        model(x).sum().backward()  # a training step with the recorder open
    for out, res in rec.moments():
        for m in (out, res):
            assert m.mean is None or (not m.mean.requires_grad and m.mean.grad_fn is None)


# ---- --device -----------------------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if CUDA else "mps" if MPS else "cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(SppError, match="--device"):
            resolve_device(bad)


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_unavailable_cuda_is_one_line_error():
    with pytest.raises(SppError, match=r"--device cuda: .*use --device cpu"):
        resolve_device("cuda")
    result = CliRunner().invoke(app, ["record", "--model", "nf_resnet50", "--width", "0.125", "--device", "cuda",
                                      "--out", "x.json"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_too_high_cuda_index_or_missing_mps():
    with pytest.raises(SppError, match="--device"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")
    if not MPS:
        with pytest.raises(SppError, match="MPS"):
            resolve_device("mps")


# ---- --dtype ------------------------------------------------------------------------------------------------------
def test_resolve_dtype():
    assert resolve_dtype("float32") is None
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(SppError, match="--dtype must be one of float32, bfloat16, float16"):
        resolve_dtype("int8")


def test_bfloat16_forward_on_cpu_keeps_float32_statistics():
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4)
    full = record_run(cfg)
    low = record_run(RunConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
    assert [r["count"] for r in low.rows] == [r["count"] for r in full.rows]
    for a, b in zip(full.rows[1:], low.rows[1:], strict=True):
        assert b["avg_var"] == pytest.approx(a["avg_var"], rel=0.1)  # bf16 rounding, not a different model
    assert any(a["avg_var"] != b["avg_var"] for a, b in zip(full.rows, low.rows, strict=True))  # autocast ran
    assert low.settings["run"]["dtype"] == "bfloat16"


def test_users_model_keeps_its_dtype_and_weights():
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RunConfig(model="mine", resolution=32, batch_size=2, dtype="bfloat16")
    record_run(cfg, loaded=LoadedModel(model, "mine", "file", "mine"))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_cli_rejects_bad_dtype():
    result = CliRunner().invoke(app, ["record", "--model", "nf_resnet50", "--dtype", "int8", "--out", "x.json"])
    assert result.exit_code == 2 and "--dtype" in result.output


# ---- CUDA (skipped without a GPU) -----------------------------------------------------------------------------
@needs_cuda
def test_cuda_channel_stats_equal_float64():
    for shape in [(8, 16, 2, 2), (8, 32, 20, 20), (4, 197, 48)]:
        x = shifted(shape).cuda()
        check(x, x.ndim - 1 if len(shape) == 3 else 1)
    check(shifted((4, 8, 6, 6), dtype=torch.bfloat16).cuda(), 1)


@needs_cuda
def test_cuda_record_equals_cpu_record():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4,
                    num_samples=8)
    cpu = record_run(cfg)
    gpu = record_run(RunConfig(**{**cfg.__dict__, "device": "cuda"}))
    for a, b in zip(cpu.rows[1:], gpu.rows[1:], strict=True):
        assert b["avg_var"] == pytest.approx(a["avg_var"], rel=1e-4)
        assert b["res_avg_var"] == pytest.approx(a["res_avg_var"], rel=1e-4)
    half = record_run(RunConfig(**{**cfg.__dict__, "device": "cuda", "dtype": "bfloat16"}))
    assert all(r["nonfinite"] == 0 for r in half.rows)


@needs_cuda
def test_cuda_recorder_syncs_only_at_snapshot():
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with spp.hooks.SignalRecorder(model, mode="eval") as rec, torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the hooks raises
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert rec.snapshot().rows[-1]["count"] == 4


# ---- activation checkpointing: a recompute in backward is not a new batch ------------------------------------------
class _Block(torch.nn.Module):
    spp_residual = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.relu(x))


class _Checkpointed(torch.nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 1)
        self.blocks = torch.nn.Sequential(*[_Block() for _ in range(3)])
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = self.stem(x)
        for b in self.blocks:
            x = b(x) if self.reentrant is None else checkpoint(b, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_each_block_once(reentrant):
    torch.manual_seed(0)
    plain = _Checkpointed(None)
    ckpt = _Checkpointed(reentrant)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    records = []
    for model in (plain, ckpt):
        with spp.hooks.SignalRecorder(model) as rec:
            model(x).square().sum().backward()
        records.append(rec.snapshot())
    a, b = records
    assert [r["count"] for r in b.rows] == [r["count"] for r in a.rows] == [128] * 4
    assert b.settings["batches"] == a.settings["batches"] == 1
    assert [r["avg_var"] for r in b.rows] == pytest.approx([r["avg_var"] for r in a.rows], rel=1e-6)

"""The recorder: exact statistics, exact micro-batch aggregation, and a model left exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch

import spp.hooks
from spp.errors import SppError
from spp.models import create_model
from spp.moments import ChannelMoments
from tests.direct import assert_close, capture, direct_stats


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_model(name, width=kw.pop("width", 0.125), **kw)


def snapshot_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{k} changed"


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


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


# ---- statistics equal a direct computation -------------------------------------------------------------------
@pytest.mark.parametrize("name,mode", [("nf_resnet50", "train"), ("bn_relu_resnet50", "train"),
                                       ("relu_bn_resnet50", "eval")])
def test_every_block_equals_direct_computation(name, mode):
    model = tiny(name)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    rec = spp.hooks.record(model, x, mode=mode)
    df = rec.to_frame()
    blocks = list(df["name"][1:])
    model.train(mode == "train")
    # Capture in the same mode, with running stats frozen so the capture itself changes nothing relevant.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = mode == "eval"
    seen = capture(model, [*blocks, *[f"{b}.conv3" for b in blocks]], [x])
    for i, b in enumerate(blocks, start=1):
        sq, var = direct_stats(seen[b][0])
        _, res = direct_stats(seen[f"{b}.conv3"][0])
        assert_close(df["avg_sq_mean"][i], sq, 1e-5, f"{b} sq mean")
        assert_close(df["avg_var"][i], var, 1e-5, f"{b} var")
        assert_close(df["res_avg_var"][i], res, 1e-5, f"{b} residual var")
    stem_sq, stem_var = direct_stats(model.stem(x))
    assert_close(df["avg_var"][0], stem_var, 1e-5, "stem var")
    assert_close(df["avg_sq_mean"][0], stem_sq, 1e-5, "stem sq mean")
    assert math.isnan(df["res_avg_var"][0])


def test_frame_columns_and_stage_ends():
    rec = spp.hooks.record(tiny("nf_resnet50"), torch.randn(2, 3, 32, 32))
    df = rec.to_frame()
    assert list(df["block"]) == list(range(17))
    assert list(df["stage"]) == [0] + [1] * 3 + [2] * 4 + [3] * 6 + [4] * 3
    assert rec.stage_ends == [3, 7, 13, 16]
    assert df["name"][0] == "stem" and df["name"][1] == "stages.0.0"
    assert rec.settings["mode"] == "train" and rec.settings["samples"] == 2
    assert rec.settings["torch"] == torch.__version__


# ---- micro-batches aggregate exactly ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,mode", [("nf_resnet50", "train"), ("bn_relu_resnet50", "eval")])
def test_micro_batches_equal_their_concatenation(name, mode):
    model = tiny(name)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole = spp.hooks.record(model, x, mode=mode).to_frame()
    parts = spp.hooks.record(model, list(x.chunk(4)), mode=mode).to_frame()
    for col in ("avg_sq_mean", "avg_var", "res_avg_var"):
        for a, b in zip(whole[col][1:], parts[col][1:], strict=True):
            assert_close(b, a, 1e-6, col)
    assert list(parts["count"]) == list(whole["count"])


def test_bn_train_mode_normalises_each_micro_batch():
    """In train mode BN uses each micro-batch's own statistics, so splitting the batch rightly changes the SPP."""
    model = tiny("bn_relu_resnet50")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    whole = spp.hooks.record(model, x).to_frame()
    parts = spp.hooks.record(model, list(x.chunk(4))).to_frame()
    assert abs(whole["avg_var"].iloc[-1] - parts["avg_var"].iloc[-1]) > 1e-3


# ---- the model is left exactly as it was -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_unchanged_after_recording(mode):
    model = tiny("bn_relu_resnet50")
    model.eval()
    model.stages[1].train()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    before = snapshot_state(model)
    hooks_before = hook_count(model)
    spp.hooks.record(model, torch.randn(4, 3, 32, 32), mode=mode)
    assert_state_equal(model, before)
    assert [m.training for m in model.modules()] == flags
    assert hook_count(model) == hooks_before
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_model_unchanged_when_forward_raises():
    model = tiny("bn_relu_resnet50")
    model.train()
    before = snapshot_state(model)
    flags = [m.training for m in model.modules()]

    def boom(module, args, output):
        raise RuntimeError("boom in block 5")

    handle = model.stages[1].get_submodule("1").register_forward_hook(boom)
    hooks_with_boom = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        spp.hooks.record(model, torch.randn(4, 3, 32, 32), mode="eval")
    handle.remove()
    assert hook_count(model) == hooks_with_boom - 1 == 0
    assert_state_equal(model, before)
    assert [m.training for m in model.modules()] == flags


def test_signal_recorder_context_manager_removes_hooks_and_leaves_mode():
    model = tiny("nf_resnet50")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with spp.hooks.SignalRecorder(model) as rec:
        assert hook_count(model) > 0
        with torch.no_grad():
            model(x)
            model(x)
    assert hook_count(model) == 0
    assert not model.training
    r = rec.snapshot()
    assert r.settings["samples"] == 4 and r.settings["batches"] == 2
    # Two identical batches: same statistics as one.
    one = spp.hooks.record(model, x, mode="eval").to_frame()
    assert_close(r.to_frame()["avg_var"].iloc[-1], one["avg_var"].iloc[-1], 1e-6)


def test_batch_size_one_with_bn_in_train_mode_is_refused():
    with pytest.raises(SppError, match="batch size 1"):
        spp.hooks.record(tiny("bn_relu_resnet50"), torch.randn(1, 3, 32, 32))
    rec = spp.hooks.record(tiny("nf_resnet50"), torch.randn(1, 3, 32, 32))  # no BN: fine
    assert rec.num_blocks == 16

"""The recorder: exact statistics, exact micro-batch aggregation, and a model left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import spp
import spp.hooks
import spp.moments
from spp import hooks
from spp.errors import SppError
from spp.models import create_model
from tests.helpers import assert_close, capture_outputs, direct_stats
from tests.toys import Chain

CUDA = torch.cuda.is_available()

MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




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
    seen = capture_outputs(model, [*blocks, *[f"{b}.conv3" for b in blocks]], [x])
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








class _Layout(nn.Module):
    """One residual block whose branch is a child: lets the tests feed any tensor layout."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


def _one_block(fn: nn.Module) -> nn.Module:
    """float64 throughout, so the recorder's statistics can be held to 1e-9 against the direct ones."""
    return Chain(_Layout(fn)).double().eval()



def _direct(x: torch.Tensor, axis: int) -> tuple[float, float]:
    x = x.double()
    c = x.shape[axis]
    flat = x.movedim(axis, -1).reshape(-1, c)
    mean = flat.sum(0) / flat.shape[0]
    var = ((flat - mean) ** 2).sum(0) / flat.shape[0]
    return float((mean**2).mean()), float(var.mean())



def _close(a, b):
    assert all(math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-15) for p, q in zip(a, b, strict=True)), (a, b)



def _check_layout(model: nn.Module, x: torch.Tensor, axis: int, **kwargs) -> tuple[float, ...]:
    """Recorded stem, block output and branch statistics equal the direct ones along ``axis``."""
    rec = hooks.record(model, x, mode="eval", **kwargs)
    stem, block = rec.rows
    with torch.no_grad():
        branch = model.blocks[0].fn(x)
        out = x + branch
    _close((stem["avg_sq_mean"], stem["avg_var"]), _direct(x, axis))
    _close((block["avg_sq_mean"], block["avg_var"]), _direct(out, axis))
    assert math.isclose(block["res_avg_var"], _direct(branch, axis)[1], rel_tol=1e-9)
    return stem["avg_sq_mean"], stem["avg_var"], block["avg_sq_mean"], block["avg_var"], block["res_avg_var"]



def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)



def test_layout_nchw_and_channels_last_agree():
    torch.manual_seed(0)
    model = _one_block(nn.Conv2d(5, 5, 3, padding=1))
    x = _randn(3, 5, 6, 7) + 0.3
    nchw = _check_layout(model, x, 1)
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    assert x_cl.stride(1) == 1 and model_cl(x_cl).stride(1) == 1  # really channels-last in memory
    channels_last = _check_layout(model_cl, x_cl, 1)
    _close(channels_last, nchw)


def test_layout_tokens_and_2d():
    torch.manual_seed(0)
    model = _one_block(nn.Linear(6, 6))
    _check_layout(model, _randn(2, 9, 6) * 2 + 1, 2)  # tokens (B, N, C): channels last
    _check_layout(model, _randn(4, 6) - 0.5, 1)  # (B, C)


def test_layout_explicit_channel_dim_override():
    torch.manual_seed(0)
    model = _one_block(nn.Conv2d(3, 3, 1))
    x = _randn(2, 3, 5, 4) + torch.arange(5.0, dtype=torch.float64).reshape(1, 1, 5, 1)
    rows = _check_layout(model, x, 2, channel_dim=2)  # statistics per row (axis 2), not per channel
    assert not math.isclose(rows[0], _direct(x, 1)[0], rel_tol=1e-3)  # the override changed the answer



# ---- trust: axes proven, identities checked, refusals that say why -------------------------------------------------
class _NormThenConv(nn.Module):
    """x + conv(norm(x)) in NCHW, with a LayerNorm subclass that permutes (timm's LayerNorm2d pattern): its type says
    "channels last", the tensor's channels are on axis 1."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        from tests.test_axes import PermutingLayerNorm

        self.norm = PermutingLayerNorm(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.norm(x))


def test_the_channel_axis_comes_from_the_layers_not_a_norms_type():
    torch.manual_seed(0)
    model = Chain(_NormThenConv(), _NormThenConv(), stem=nn.Conv2d(3, 6, 1)).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    rec = spp.hooks.record(model, x, mode="eval")
    assert [r["axis"] for r in rec.rows] == [1, 1, 1] and [r["check"] for r in rec.rows] == ["-", "verified",
                                                                                               "verified"]
    out = capture_outputs(model, ["blocks.0"], [x])["blocks.0"][0]
    assert_close(rec.rows[1]["avg_var"], direct_stats(out, 1)[1], 1e-6, "block 0 on axis 1")


def test_a_wrong_branch_site_is_refused_not_plotted():
    """A hand-made tap naming the branch's inner BN as the branch: the residual identity fails on the first batch,
    the row holds NaN and says why."""
    from spp.discovery import find_taps
    from spp.taps import Site
    from tests.toys import PreActToy

    torch.manual_seed(0)
    model = Chain(PreActToy(), PreActToy()).eval()
    taps = find_taps(model)
    wrong = [taps[0], dataclasses.replace(taps[1], residual=Site("blocks.0.branch.0")), taps[2]]
    rec = spp.hooks.record(model, torch.randn(2, 4, 8, 8), mode="eval", taps=wrong)
    row = rec.rows[1]
    assert row["check"] == "refused" and "residual identity fails" in row["note"]
    assert math.isnan(row["avg_var"]) and math.isnan(row["res_avg_var"]) and rec.rows[2]["check"] == "verified"


class _Opaque(nn.Module):
    """x + f(x) where nothing around the tensors is a layer whose type says where channels are."""

    def forward(self, x):
        return x + torch.tanh(x.flip(1))


def test_an_unprovable_axis_is_refused_until_named():
    model = Chain(_Opaque(), _Opaque()).eval()
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    rec = spp.hooks.record(model, x, mode="eval", blocks=["blocks.*"])
    assert all(r["check"] == "refused" and "--channel-dim" in r["note"] for r in rec.rows[1:])
    named = spp.hooks.record(model, x, mode="eval", blocks=["blocks.*"], channel_dim={"blocks.*": 1, "stem": 1})
    assert [r["axis"] for r in named.rows] == [1, 1, 1] and all(r["check"] != "refused" for r in named.rows)
    assert_close(named.rows[0]["avg_var"], direct_stats(x, 1)[1], 1e-6, "stem on axis 1")
    with pytest.raises(SppError, match="channel axis 3 does not exist"):
        spp.hooks.record(model, x, mode="eval", blocks=["blocks.*"], channel_dim=3)

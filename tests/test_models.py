"""The reference models against the theory of signal propagation (Brock, De, Smith 2021)."""

from __future__ import annotations

import math

import pytest
import torch

import spp.hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.models import DEPTHS, create_model, list_models, nearest_depth
from spp.models.activations import gamma, second_moment_gain
from spp.models.layers import ScaledStdConv2d
from tests.helpers import assert_close

ALPHA = 0.2


def spp_frame(name: str, *, width=0.25, resolution=128, batch=8, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(name, width=width, **kw)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    return spp.hooks.record(model, x).to_frame()


def padding_keep(n: int) -> float:
    """Fraction of variance a 3x3 zero-padded conv keeps on an n x n map: ((n-2)*3 + 2*2) / (3n), per axis."""
    return (((n - 2) * 3 + 4) / (3 * n)) ** 2


# ---- constants -------------------------------------------------------------------------------------------------
def test_gamma_matches_the_closed_forms():
    assert_close(gamma("relu"), math.sqrt(2 / (1 - 1 / math.pi)), 1e-7, "relu")
    assert_close(gamma("identity"), 1.0, 1e-9, "identity")
    # Exact integrals (the paper's table is a sampled estimate of these).
    assert_close(gamma("silu"), 1.787187, 2e-6, "silu")
    assert_close(gamma("gelu"), 1.700926, 2e-6, "gelu")
    assert_close(gamma("tanh"), 1.592537, 2e-6, "tanh")
    assert_close(second_moment_gain("relu"), math.sqrt(2), 1e-7, "He gain")


def test_gamma_makes_activation_variance_preserving():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, fn in (("relu", torch.relu), ("tanh", torch.tanh), ("silu", torch.nn.functional.silu)):
        assert_close(float((fn(z) * gamma(name)).var()), 1.0, 5e-3, name)


def test_scaled_ws_standardises_each_output_channel():
    conv = ScaledStdConv2d(16, 8, 3, gamma=gamma("relu"))
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)  # any scale and offset: the forward standardises it away
        w = conv.standardized_weight().double()
    fan_in = 16 * 9
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-7)
    assert torch.allclose((w**2).sum(dim=(1, 2, 3)), torch.full((8,), gamma("relu") ** 2, dtype=torch.float64),
                          rtol=1e-5)
    assert w[0].numel() == fan_in and torch.equal(conv.bias, torch.zeros(8)) and torch.equal(conv.gain,
                                                                                             torch.ones(8, 1, 1, 1))


# ---- registry --------------------------------------------------------------------------------------------------
def test_registry_names_and_depths():
    names = list_models(kind="resnet")
    assert len(names) == 18
    for depth, layers in DEPTHS.items():
        for fam in ("bn_relu_resnet", "relu_bn_resnet", "nf_resnet"):
            assert f"{fam}{depth}" in names
        assert nearest_depth(sum(layers)) == depth
    assert nearest_depth(17) == 50 and nearest_depth(10_000) == 600
    with pytest.raises(SppError, match="did you mean: nf_resnet600"):
        create_model("nf_resnet60")


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_block_count_and_shapes_match_the_depth_table(depth):
    torch.manual_seed(0)
    model = create_model(f"nf_resnet{depth}", width=1 / 16)
    taps = find_taps(model)
    assert len(taps) == 1 + sum(DEPTHS[depth])
    assert [sum(1 for t in taps if t.stage == s) for s in (1, 2, 3, 4)] == list(DEPTHS[depth])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_full_width_architecture():
    model = create_model("bn_relu_resnet50")
    assert model.stem.conv.out_channels == 64 and model.stem.conv.kernel_size == (7, 7)
    assert [s[-1].conv3.out_channels for s in model.stages] == [256, 512, 1024, 2048]
    assert [s[0].conv2.stride for s in model.stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert all(s[0].shortcut is not None and s[0].shortcut.kernel_size == (1, 1) for s in model.stages)
    assert all(b.shortcut is None for s in model.stages for b in list(s)[1:])
    assert model.stages[2][0].conv1.out_channels == 256  # bottleneck width = out / 4
    # He init: N(0, 2 / fan_in)
    w = model.stages[3][1].conv2.weight
    assert_close(float(w.detach().var()), 2 / (512 * 9), 0.02, "He variance")


# ---- NF-ResNet with Scaled WS ----------------------------------------------------------------------------------
def test_nf_resnet_beta_bookkeeping():
    model = create_model("nf_resnet50", width=1 / 16)
    expected, betas = [], []
    for stage in model.stages:
        for block in stage:
            betas.append(block.beta)
            expected.append(block.spp_expected_var)
    # Stage 1: 1.04, 1.08, 1.12; stage 2 restarts at 1.04, and its first block's beta is sqrt(1.12).
    assert expected[:4] == pytest.approx([1 + ALPHA**2, 1 + 2 * ALPHA**2, 1 + 3 * ALPHA**2, 1 + ALPHA**2])
    assert betas[:4] == pytest.approx([1.0, math.sqrt(1.04), math.sqrt(1.08), math.sqrt(1.12)])
    assert betas[7] == pytest.approx(math.sqrt(1 + 4 * ALPHA**2))


def test_nf_resnet_variance_follows_theory():
    df = spp_frame("nf_resnet50", width=0.5)
    sizes = {1: 32, 2: 16, 3: 8, 4: 4}  # feature map side per stage at 128 px
    k_in_stage = df.groupby("stage").cumcount() + 1
    for i in range(1, len(df)):
        stage, k = int(df["stage"][i]), int(k_in_stage[i])
        var, res, sq = df["avg_var"][i], df["res_avg_var"][i], df["avg_sq_mean"][i]
        if stage <= 2:  # maps large enough for the closed form
            assert_close(var, 1 + k * ALPHA**2, 0.03, f"block {i} variance")
            assert_close(res, padding_keep(sizes[stage]), 0.15, f"block {i} residual variance")
        assert sq < 0.05 * var, f"block {i}: squared mean {sq} not far below variance {var}"
        if k > 1:  # identity shortcut: variances add
            assert_close(var - df["avg_var"][i - 1], ALPHA**2 * res, 0.25, f"block {i} additivity")
    for stage in (1, 2):
        mean_res = float(df["res_avg_var"][df["stage"] == stage].mean())
        assert_close(mean_res, padding_keep(sizes[stage]), 0.06, f"stage {stage} mean residual variance")
    assert_close(df["expected_var"][16], 1 + 3 * ALPHA**2, 1e-12, "theory column")


def test_nf_resnet_without_ws_shows_mean_shift():
    df = spp_frame("nf_resnet50", ws=False)
    sq, var = df["avg_sq_mean"], df["avg_var"]
    for stage in (1, 2, 3, 4):
        s = sq[df["stage"] == stage]
        assert s.iloc[-1] > s.iloc[0], f"stage {stage}: squared mean does not grow"
    assert (sq[1:] > var[1:]).any(), "squared mean never exceeds the variance"
    with_ws = spp_frame("nf_resnet50")
    assert (sq[1:] > 10 * with_ws["avg_sq_mean"][1:]).all()


def test_nf_resnet_alpha_option():
    df = spp_frame("nf_resnet50", alpha=0.5, width=0.25)
    assert_close(df["avg_var"][3], 1 + 3 * 0.25, 0.05, "alpha 0.5, 3rd block")


# ---- BatchNorm references --------------------------------------------------------------------------------------
def test_bn_relu_conv_signal_propagation():
    df = spp_frame("bn_relu_resnet50")
    res = df["res_avg_var"][1:]
    # relu(z) of a unit Gaussian has variance (1 - 1/pi) / 2 and He init doubles it (the row means of the
    # weights move into the squared mean, not the per-channel variance).
    assert_close(float(res.mean()), 1 - 1 / math.pi, 0.05, "mean residual variance")
    for stage in (1, 2, 3, 4):
        v = df["avg_var"][df["stage"] == stage]
        s = df["avg_sq_mean"][df["stage"] == stage]
        assert (v.diff().dropna() > 0).all(), f"variance does not grow within stage {stage}"
        assert s.iloc[-1] > s.iloc[0], f"squared mean does not grow within stage {stage}"
    for end in (3, 7, 13):
        assert df["avg_var"][end + 1] < df["avg_var"][end], f"no drop after stage end {end}"


def test_relu_bn_conv_signal_propagation():
    df = spp_frame("relu_bn_resnet50")
    # conv3 sees BN output (zero mean, unit variance per channel) through He weights N(0, 2/fan_in):
    # residual variance 2 * var/(var + eps), i.e. 2, and the block adds no channel mean.
    assert_close(float(df["res_avg_var"][1:].mean()), 2.0, 0.03, "mean residual variance")
    assert (df["avg_sq_mean"][1:] < 0.01 * df["avg_var"][1:]).all()

"""The pre-activation references with BN, GN, LN, IN or no norm, against the theory in spp.models.resnet.

Small models (width 0.25, 64 px, batch 8, depth 50: maps 16, 8, 4, 2 px in stages 1-4), Gaussian inputs,
BatchNorm in train mode (spp's default). Channel statistics are per channel over (N, H, W), as the SPP takes them.
Derived values used below (see spp.models.resnet's docstring for the derivations):

* a norm's output z, relu, 1x1 He conv: the conv output's power is 2 E[relu(z)^2] = E[z^2] = 1, of which the
  channel means carry g(t) = (sqrt(1 - t^2) + t (pi - arccos t)) / pi, t = the share of z's power in its channel
  means (the arc-cosine kernel of two unit Gaussians with correlation t). Residual variance 1 - g(t3).
* BN and IN make t = 0 exactly: residual variance 1 - E|z_1|^2 / 2 for a set of n standardised values
  (E|z_1| below; 1 - 1/pi as n grows), n = N H W for BN, H W for IN.
* At the k-th block of a stage, avg_var + avg_sq_mean = k + 1 for every norm (each branch and the projection add
  power 1; the projection reads the normalised input, so every stage restarts at 2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spp.hooks
from spp.errors import SppError
from spp.models import NORMS, create_model, get_entry
from spp.models.resnet import GroupNorm, InstanceNorm2d
from tests.helpers import assert_close

WIDTH, RES, BATCH = 0.25, 64, 8
STAGE_SIDE = {1: 16, 2: 8, 3: 4, 4: 2}  # map side per stage at 64 px (stem /4, then strides 1, 2, 2, 2)
ONE_MINUS_1_PI = 1 - 1 / math.pi


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(norm: str, order: str = "bn_relu", seed: int = 0, width: float = WIDTH, **kw):
    torch.manual_seed(seed)
    return create_model(f"{order}_resnet50", width=width, norm=norm, **kw)


def gaussian(seed: int = 0, batch: int = BATCH, res: int = RES) -> torch.Tensor:
    return torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(seed))


def blocks(model) -> list:
    return [b for stage in model.stages for b in stage]


def last_norm(block, order: str):
    """The norm layer whose output conv3 reads (through relu in Norm-ReLU-Conv)."""
    return block.pre3[0] if order == "bn_relu" else block.pre3[1]


def record_with_norm_outputs(model, x, order: str = "bn_relu", mode: str = "train"):
    """spp's SPP frame, and each block's last-norm output captured with hooks of our own during the same run."""
    seen: list[torch.Tensor] = []
    handles = [last_norm(b, order).register_forward_hook(lambda m, a, out: seen.append(out.detach().double()))
               for b in blocks(model)]
    try:
        df = spp.hooks.record(model, x, mode=mode).to_frame()
    finally:
        for h in handles:
            h.remove()
    return df.iloc[1:].reset_index(drop=True), seen


def mean_share(z: torch.Tensor) -> float:
    """t: the share of z's power (avg over channels of E[z_c^2]) carried by its channel means over (N, H, W)."""
    mean = z.mean(dim=(0, 2, 3))
    power = (z * z).mean(dim=(0, 2, 3))
    return float((mean * mean).mean() / power.mean())


def arccos_mean_share(t: float) -> float:
    """g(t): share of a He conv's output power in channel means when relu's input has mean share t."""
    return (math.sqrt(max(0.0, 1 - t * t)) + t * (math.pi - math.acos(min(1.0, t)))) / math.pi


def abs_standardised(n: int) -> float:
    """E|z_1| for n values standardised to mean 0 and population variance 1 (uniform on a sphere in n - 1 dims)."""
    return math.sqrt(n - 1) * math.exp(math.lgamma((n - 1) / 2) - math.lgamma(n / 2)) / math.sqrt(math.pi)


def relu_branch_variance(n: int) -> float:
    """Residual variance 2 Var(relu(z)) = 1 - E|z_1|^2 / 2 for z standardised over sets of n values (mean of relu
    over a set = sum|z| / 2n, E[relu(z)^2] = 1/2 by symmetry)."""
    return 1 - abs_standardised(n) ** 2 / 2


def k_in_stage(df) -> np.ndarray:
    return df.groupby("stage").cumcount().to_numpy() + 1


# ---- construction ----------------------------------------------------------------------------------------------
def test_norm_option_builds_the_named_layers():
    expected = {"bn": torch.nn.BatchNorm2d, "gn": GroupNorm, "ln": GroupNorm, "in": InstanceNorm2d,
                "none": torch.nn.Identity}
    assert set(expected) == set(NORMS)
    for norm, cls in expected.items():
        model = build(norm)
        layers = [m for b in blocks(model) for m in (b.pre1[0], b.pre2[0], b.pre3[0])] + [model.final[0]]
        assert all(type(m) is cls for m in layers), norm
    gn = build("gn")  # 32 groups, or one channel per group where C <= 32 (C = 16 for stage 1's bottleneck)
    first = gn.stages[0][0]
    assert (first.pre2[0].num_channels, first.pre2[0].num_groups) == (16, 16)
    assert (gn.stages[0][1].pre1[0].num_channels, gn.stages[0][1].pre1[0].num_groups) == (64, 32)
    assert gn.stages[3][1].pre1[0].num_groups == 32
    ln = build("ln")
    assert all(b.pre1[0].num_groups == 1 for b in blocks(ln))
    inst = build("in").stages[1][0].pre2[0]
    assert inst.affine and not inst.track_running_stats
    gn4 = build("gn", groups=4).stages[2][1].pre1[0]
    assert (gn4.num_channels, gn4.num_groups) == (256, 4)
    assert "norm=bn|gn|ln|in|none" in get_entry("bn_relu_resnet50").description


def test_bad_norm_options_are_one_line_errors():
    with pytest.raises(SppError, match="3 groups do not divide 16, 32, 64, 128, 256, 512 channels"):
        build("gn", groups=3)
    with pytest.raises(SppError, match="did you mean: gn"):
        build("gnn")
    with pytest.raises(SppError, match="applies to norm=gn only"):
        build("ln", groups=8)
    with pytest.raises(SppError, match="positive"):
        build("gn", groups=0)
    with pytest.raises(SppError, match="resolution of at least 64"):
        spp.hooks.record(build("in"), gaussian(res=32))  # stage 4 maps are 1x1 at 32 px


# ---- what normalises over what ---------------------------------------------------------------------------------
def test_what_each_norm_normalises_over():
    """At init (affine 1 / 0) BN zeroes each channel's batch mean, IN each (sample, channel) mean, GN each
    (sample, group) mean, LN each sample's mean, and scales each such set from its input variance v to
    v / (v + eps). So the channel means over (N, H, W) that conv1/conv2 create survive LN and GN: their pre3
    outputs keep a mean share t3 > 0. Lower bound on it: conv2 hands its norm a share g(t2) >= g(0) = 1/pi, of
    which zero padding keeps kappa_m / kappa = ((1 + 2 ((n-1)/n)^2)^2 / 9) / ((3n - 2)/(3n))^2 >= 0.56 on the
    2x2 maps: >= 0.18. LN removes only the average over the C channels (1/C of it); GN with 4 groups 1/(C/4).
    We ask for 0.15 on every stage's average (chi-square noise of 16-128 channel means per block; 12 seeds
    measured: lowest 0.20)."""
    x = gaussian()
    eps = 1e-5

    def sets(z: torch.Tensor, norm: str) -> torch.Tensor:
        n, c = z.shape[:2]
        if norm == "bn":
            return z.transpose(0, 1).reshape(c, -1)  # per channel over (N, H, W)
        return z.reshape({"in": n * c, "gn": n * 4, "ln": n}[norm], -1)

    for norm, kw in (("bn", {}), ("in", {}), ("gn", {"groups": 4}), ("ln", {})):
        model = build(norm, **kw)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        handles = [last_norm(b, "bn_relu").register_forward_hook(
            lambda m, a, out, pairs=pairs: pairs.append((a[0].detach().double(), out.detach().double())))
            for b in blocks(model)]
        try:
            df = spp.hooks.record(model, x).to_frame().iloc[1:].reset_index(drop=True)
        finally:
            for h in handles:
                h.remove()
        for z_in, z_out in pairs:
            v = sets(z_in, norm).var(dim=1, unbiased=False)
            out = sets(z_out, norm)
            assert out.mean(dim=1).abs().max() < 1e-5, norm
            assert torch.allclose(out.var(dim=1, unbiased=False), v / (v + eps), rtol=1e-4, atol=1e-6), norm
        t3 = np.array([mean_share(z_out) for _, z_out in pairs])
        if norm in ("bn", "in"):
            assert t3.max() < 1e-10, f"{norm}: channel means survive: {t3.max()}"
        else:
            for stage in (1, 2, 3, 4):
                share = t3[df["stage"].to_numpy() == stage].mean()
                assert share > 0.15, f"{norm} stage {stage}: mean share {share}"


def test_per_sample_norms_have_no_batch_or_mode_dependence():
    """GN, LN, IN (and no norm) read no other sample and keep no running buffers: train mode and eval mode are
    the same function, and eight micro-batches of one sample record what one batch of eight records (the
    recorder's merge is exact). BN is the control: its eval mode at init is an identity (buffers 0 / 1) and its
    train mode depends on the micro-batch."""
    x = gaussian()
    singles = list(x.split(1))
    for norm in ("gn", "ln", "in", "none"):
        model = build(norm)
        train = spp.hooks.record(model, x, mode="train").rows
        evaluate = spp.hooks.record(model, x, mode="eval").rows
        split = spp.hooks.record(model, singles, mode="train").rows
        for a, b, c in zip(train, evaluate, split, strict=True):
            for key in ("avg_sq_mean", "avg_var", "res_avg_var"):
                if a[key] == a[key]:
                    assert a[key] == b[key], f"{norm} {a['name']} {key}: train {a[key]} eval {b[key]}"
                    assert_close(c[key], a[key], 1e-4, f"{norm} {a['name']} {key}: per sample vs batch")
    bn = build("bn")
    train = spp.hooks.record(bn, x, mode="train").to_frame()
    evaluate = spp.hooks.record(bn, x, mode="eval").to_frame()
    pairs = spp.hooks.record(bn, list(x.split(2)), mode="train").to_frame()
    assert (abs(np.log10(evaluate["avg_var"][1:] / train["avg_var"][1:])) > 0.3).any()
    assert (abs(pairs["res_avg_var"][1:] / train["res_avg_var"][1:] - 1) > 0.05).any()


def test_group_norm_with_one_channel_per_group_is_instance_norm():
    """min(groups, C) = C groups: GroupNorm normalises each (sample, channel) over (H, W), which is InstanceNorm.
    At width 1/16 every channel count is <= 128, so gn with groups=128 and in build the same network (norm
    layers draw no random numbers: the same seed gives the same convs) and record the same SPP."""
    gn = build("gn", width=1 / 16, groups=128)
    inst = build("in", width=1 / 16)
    assert all(m.num_groups == m.num_channels for m in gn.modules() if isinstance(m, torch.nn.GroupNorm))
    x = gaussian()
    a = spp.hooks.record(gn, x).rows
    b = spp.hooks.record(inst, x).rows
    for ra, rb in zip(a, b, strict=True):
        for key in ("avg_sq_mean", "avg_var", "res_avg_var"):
            if ra[key] == ra[key]:
                assert_close(rb[key], ra[key], 1e-4, f"{ra['name']} {key}")  # two kernels' rounding


# ---- Norm-ReLU-Conv ------------------------------------------------------------------------------------------
def test_bn_and_in_give_one_minus_one_over_pi():
    """BN and IN zero every channel mean (t3 = 0): residual variance 1 - E|z_1|^2/2 with n = N H W (BN) or H W
    (IN) values per normalisation set; the stream variance at the k-th block of stages 2-4 is the projection's
    (its norm at the previous stage's resolution) plus the branches' (stage 1's projection reads the stem's
    max-pool output, skewed, not Gaussian: left out). 1 - 1/pi = 0.682 for large sets; IN on 2x2 maps: 0.625.
    Tolerances 7% per stage mean and 9% per block (12 seeds measured: worst 5.2% and 7.4%; 512 channels of
    random 1x1 weights in stage 4 still leave a few % of noise)."""
    x = gaussian()
    for norm in ("bn", "in"):
        df = spp.hooks.record(build(norm), x).to_frame().iloc[1:].reset_index(drop=True)
        stage = df["stage"].to_numpy()

        def expected(side: int, norm: str = norm) -> float:
            return relu_branch_variance(BATCH * side * side if norm == "bn" else side * side)

        for s in (1, 2, 3, 4):
            res = float(df["res_avg_var"][stage == s].mean())
            assert_close(res, expected(STAGE_SIDE[s]), 0.07, f"{norm} stage {s} mean residual variance")
        for s in (2, 3, 4):
            var = df["avg_var"][stage == s].to_numpy()
            theory = expected(STAGE_SIDE[s - 1]) + expected(STAGE_SIDE[s]) * np.arange(1, len(var) + 1)
            for k, (v, e) in enumerate(zip(var, theory, strict=True)):
                assert_close(float(v), float(e), 0.09, f"{norm} stage {s} block {k + 1} variance")
    assert_close(relu_branch_variance(10**6), ONE_MINUS_1_PI, 1e-6, "large-n limit")
    assert_close(relu_branch_variance(4), 0.625, 1e-12, "2x2 instance")


@pytest.mark.parametrize(("norm", "kw"), [("ln", {}), ("gn", {"groups": 4})])
def test_ln_and_gn_residual_variance_follows_the_surviving_channel_means(norm, kw):
    """LN and GN leave channel means in their output (t3 > 0): the residual variance is 1 - g(t3) < 1 - 1/pi,
    with t3 read from pre3's output by our own hooks. Per stage, averaged over its blocks and two seeds; each
    block's conv3 mixes 64-512 channel means with random weights (chi-square noise of sqrt(2/C) on the mean
    part), so 12% (12 seeds measured: worst 7.8%)."""
    for seed in (0, 1):
        df, outs = record_with_norm_outputs(build(norm, seed=seed, **kw), gaussian(seed))
        predicted = np.array([1 - arccos_mean_share(mean_share(z)) for z in outs])
        res = df["res_avg_var"].to_numpy()
        stage = df["stage"].to_numpy()
        for s in (1, 2, 3, 4):
            assert_close(float(res[stage == s].mean()), float(predicted[stage == s].mean()), 0.12,
                         f"{norm} seed {seed} stage {s}")
        assert res[stage > 1].mean() < ONE_MINUS_1_PI - 0.15, f"{norm}: {res.mean()} not below BN's 1 - 1/pi"


def test_total_power_and_its_reset_at_stage_transitions():
    """Every norm: avg_var + avg_sq_mean = k + 1 at the k-th block of a stage, restarting at 2 on each stage's
    first block (the projection reads relu(norm(x)) and adds power 1, the branch 1). Per stage, averaged over its
    blocks: BN / IN within 14%, LN / GN within 25% (12 seeds measured: worst 11% and 19%: the channel-mean part of
    the power is a chi-square over 64-512 channels, and LN / GN put more of the power there). Without a norm
    nothing resets: each stage's first block has more power than the block before it."""
    x = gaussian()
    for norm, kw, tol in (("bn", {}, 0.14), ("in", {}, 0.14), ("gn", {"groups": 4}, 0.25), ("ln", {}, 0.25)):
        df = spp.hooks.record(build(norm, **kw), x).to_frame().iloc[1:].reset_index(drop=True)
        ratio = (df["avg_var"] + df["avg_sq_mean"]).to_numpy() / (k_in_stage(df) + 1)
        for s in (1, 2, 3, 4):
            assert_close(float(ratio[df["stage"].to_numpy() == s].mean()), 1.0, tol, f"{norm} stage {s}")
    df = spp.hooks.record(build("none"), x).to_frame()
    power = (df["avg_var"] + df["avg_sq_mean"]).to_numpy()
    firsts = [i for i in range(2, len(df)) if df["stage"][i] != df["stage"][i - 1]]
    assert len(firsts) == 3
    assert all(power[i] > power[i - 1] for i in firsts)
    assert power[-1] > 1000 * power[0]


# ---- ReLU-Norm-Conv --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["bn", "in", "ln"])
def test_relu_norm_conv_residual_variance(norm):
    """conv3 reads the norm's output z3 directly: residual variance 2 avg_c Var(z3_c) (He weights N(0, 2/C)).
    BN: every channel has variance v / (v + eps) ~ 1 and mean 0: 2. IN: every (sample, channel) has mean 0 and
    variance ~1, less where relu left a 2x2 set all zeros (normalised to 0: about 1 set in 16 in stage 4). LN:
    relu's channel means are nearly common to all channels, a per-sample mean LN removes, so little of z3's power
    sits in channel means and it reads close to 2 too. Per stage within 4% (12 seeds measured: worst 2.6%)."""
    df, outs = record_with_norm_outputs(build(norm, order="relu_bn"), gaussian(), order="relu_bn")
    predicted = np.array([2 * float(z.var(dim=(0, 2, 3), unbiased=False).mean()) for z in outs])
    res, stage = df["res_avg_var"].to_numpy(), df["stage"].to_numpy()
    for s in (1, 2, 3, 4):
        assert_close(float(res[stage == s].mean()), float(predicted[stage == s].mean()), 0.04, f"{norm} stage {s}")
    if norm == "bn":
        assert_close(float(predicted.mean()), 2.0, 1e-3, "BN: unit variance per channel")
    assert float(predicted.mean()) > 1.8

"""The ResNet skeleton shared by every reference family, and the two pre-activation families with a choice of norm.

Stem: 7x7/2 conv to 64 channels, 3x3/2 max-pool. Stages of bottleneck blocks with outputs 256/512/1024/2048,
bottleneck width out/4, the stride on the 3x3 conv, and a 1x1 projection shortcut (carrying the stride) on each
stage's first block. Blocks name their residual-branch output in ``spp_residual`` so the recorder need not guess.

Signal propagation at init, per norm (``norm=bn|gn|ln|in|none``; He-init convs, relu, BN in train mode)
-------------------------------------------------------------------------------------------------------
Notation: for an activation z that a norm produced, ``t`` = the share of its second moment carried by the channel
means: t = avg_c mean_c^2 / avg_c E[z_c^2], means and variances per channel over (N, H, W) as the SPP takes them.
A 1x1 conv with weights N(0, 2/C_in) maps an input a to output channels whose average power is 2 avg_c E[a_c^2]
(cross-channel terms vanish in expectation over the weights); the input's channel-mean vector m goes through the
same weights, so the output's channel means carry 2 avg_c m_c^2 of it: the weights move means into means, never
into variance (a channel's mean becomes a random, zero-sum mixture of the input means).

Norm-ReLU-Conv (``bn_relu_resnet``): the branch ends conv3(relu(z3)), z3 the output of the third norm.
* Total power. E[relu(z)^2] = E[z^2] / 2 for a z symmetric about 0 (pooled over channels), and every norm
  gives E[z^2] = 1 (per channel for BN, per sample for the others), so each branch and each projection shortcut
  adds power 2 * 1/2 = 1. Within a stage the shortcut is the identity and the powers add: at the k-th block of a
  stage avg_var + avg_sq_mean = k + 1 for every norm. Stage transitions reset it: the first block's projection
  reads relu(norm(x)), so the stream restarts at 1 (projection) + 1 (branch) = 2, whatever x was.
* BN: every channel's batch mean is 0 and its variance 1, so t3 = 0 and relu(z3) has per-channel mean
  1/sqrt(2 pi) and variance (1 - 1/pi)/2 (z3 close to Gaussian): residual variance 2 (1 - 1/pi)/2 = 1 - 1/pi
  (0.682); the rest, 1/pi, becomes channel means (the squared mean). Stream at the k-th block of a stage:
  avg_var = (k + 1)(1 - 1/pi), avg_sq_mean = (k + 1)/pi. With n values per normalisation set (n = N H W) the
  exact finite-n value is 1 - E|z_1|^2 / 2 with E|z_1| = sqrt(n - 1) Gamma((n - 1)/2) / (sqrt(pi) Gamma(n/2))
  (the standardised set is uniform on a sphere; relu's mean over it is sum|z| / 2n), -> 1 - 1/pi as n grows.
* IN: each (sample, channel) has mean 0 and variance 1 over (H, W), so every channel's mean over (N, H, W) is 0
  too (t3 = 0) and each sample-channel's relu has the same mean: the BN values, 1 - 1/pi, with n = H W in the
  finite-n correction (a 2x2 map, n = 4: 1 - 3/8 = 0.625).
* LN (GroupNorm(1, C)) and GN: only per-sample means over a group of channels are removed. The channel means
  that conv1/conv2 put into the branch (random, zero-sum over channels, the same in every sample) are not a
  per-sample group mean, so they pass the norm: t3 > 0 (measured 0.3-0.65 at width 0.25). relu of a channel
  with mean mu: jointly Gaussian z in two positions with unit power and correlation t give the arc-cosine kernel,
  and the branch's channel means carry g(t) = (sqrt(1 - t^2) + t (pi - arccos t)) / pi of its power (g(0) = 1/pi,
  the BN case; g(1) = 1). Residual variance 1 - g(t3) < 1 - 1/pi: LN and GN pass more mean, the squared mean
  grows faster along a stage, and the variance slower, than with BN, at the same total power. GN with one
  channel per group (C <= groups, small widths) is IN and gives the BN values; the larger the groups, the closer
  to LN. In the infinite-width limit t -> g(t) creeps towards 1 (g(1 - e) = 1 - e + O(e^1.5)); at finite width
  and small maps the zero padding of the 3x3 conv turns channel means into spatial variance and halts the climb.
* Batch: gn, ln and in use no other sample and no running buffers: the SPP of a batch is the merge of its
  samples' SPPs, and train and eval mode give the same numbers. BN in eval mode at init (buffers 0 / 1) is an
  identity, a different network.

ReLU-Norm-Conv (``relu_bn_resnet``): conv3 reads z3 itself, so the residual variance is 2 avg_c Var(z3_c) =
2 (1 - t3). BN and IN: 2. relu's channel means are common to all channels (each about sigma/sqrt(2 pi)), a
per-sample group mean that LN and GN remove as well: t3 stays small and LN/GN read close to 2 as well. The stream
variance after the k-th block of a stage: 2 (k + 1).

``none``: no normalisation. He init keeps the power through relu and conv, so each branch carries
2 E[relu(x)^2] of the stream x: from its power (x symmetric) to twice it (x mean-dominated, as after the max-pool);
the SPP grows geometrically (by 2-4x per block at width 0.25) and stage transitions reset nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from spp.errors import SppError, close_matches
from spp.models.activations import Activation, second_moment_gain
from spp.models.layers import he_conv
from spp.models.registry import DEPTHS, NORMS  # noqa: F401  (re-exported)

STAGE_CHANNELS = (256, 512, 1024, 2048)
STAGE_STRIDES = (1, 2, 2, 2)
STEM_CHANNELS = 64

BlockFactory = Callable[[int, int, int, int], nn.Module]  # (in_ch, out_ch, stride, index in stage) -> block


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier, kept a multiple of 4 so the bottleneck width is whole."""
    return max(4, round(channels * width / 4) * 4)


class ResNet(nn.Module):
    """Stem, ``len(layers)`` stages of blocks from ``make_block``, then ``final`` (norm/act), pool and classifier."""

    def __init__(
        self,
        layers: Sequence[int],
        make_block: BlockFactory,
        stem_conv: nn.Module,
        final: nn.Module,
        *,
        width: float = 1.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", stem_conv)
        self.stem.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
        in_ch = int(stem_conv.out_channels)  # type: ignore[arg-type]
        stages = []
        for depth, channels, stride in zip(self.layers, STAGE_CHANNELS, STAGE_STRIDES, strict=False):
            out_ch = scaled(channels, width)
            blocks = [make_block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, i) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.final = final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(self.final(x)).flatten(1))


DEFAULT_GROUPS = 32


def group_count(channels: int, groups: int) -> int:
    """GroupNorm's group count for ``channels``: ``groups``, or every channel its own group when there are fewer
    channels than groups (``min(groups, channels)``). The count must divide the channels; see ``check_groups``."""
    return min(groups, channels)


def check_groups(channels: Sequence[int], groups: int) -> None:
    """Refuse, in one line, a group count that does not divide every normalised layer's channels.

    The rule is ``min(groups, C)`` groups for C channels (so at small widths a layer with C <= groups normalises
    each channel on its own: GroupNorm is then InstanceNorm with an affine); where that does not divide C the model
    is not built, rather than quietly getting another group count than asked for.
    """
    if groups < 1:
        raise SppError(f"groups must be a positive integer, not {groups}")
    bad = sorted({c for c in channels if c % group_count(c, groups)})
    if bad:
        raise SppError(
            f"GroupNorm: {groups} groups do not divide {', '.join(map(str, bad))} channels "
            f"(this width's channel counts: {', '.join(map(str, sorted(set(channels))))}); "
            f"pass groups= a common divisor, or another width"
        )


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that refuses a group of a single value (C/G = 1 channel on a 1x1 map): it would normalise that
    value to exactly 0 and the SPP would show a dead stage that is an artefact of the input resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and self.num_channels // self.num_groups * x.shape[2] * x.shape[3] == 1:
            raise SppError(
                "GroupNorm with one channel per group on a 1x1 map normalises every value to 0; use a resolution "
                "of at least 64 (the last stage's maps are resolution/32) or fewer groups"
            )
        return super().forward(x)


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (affine, no running statistics) that says in one line why it cannot run on 1x1 maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[2] * x.shape[3] == 1:
            raise SppError(
                "InstanceNorm on a 1x1 map normalises every value to 0; use a resolution of at least 64 "
                "(the last stage's maps are resolution/32)"
            )
        return super().forward(x)


def make_norm(kind: str, channels: int, groups: int = DEFAULT_GROUPS) -> nn.Module:
    """The normalisation layer ``kind`` for ``channels`` channels of an (N, C, H, W) activation.

    What each normalises over (statistics of the layer's input; all have a per-channel affine, init 1 / 0):

    * ``bn``: BatchNorm2d, per channel over (N, H, W): the micro-batch's statistics in train mode, the running
      buffers in eval mode (0 / 1 at init: an identity);
    * ``gn``: GroupNorm, per sample over (C/G channels, H, W) with G = ``min(groups, C)`` groups;
    * ``ln``: LayerNorm as the ResNet literature uses it, per sample over (C, H, W): GroupNorm(1, C);
    * ``in``: InstanceNorm2d with affine, per sample and channel over (H, W) (the same maths as GroupNorm(C, C));
    * ``none``: an identity.

    gn, ln and in use no other sample's values and keep no running statistics: no batch dependence, and train and
    eval mode compute the same function.
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return GroupNorm(group_count(channels, groups), channels)
    if kind == "ln":
        return GroupNorm(1, channels)
    if kind == "in":
        return InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise SppError(f"unknown norm {kind!r}{close_matches(kind, NORMS)}; known: {', '.join(NORMS)}")


def norm_act(
    channels: int, order: str, activation: str, norm: str = "bn", groups: int = DEFAULT_GROUPS
) -> nn.Sequential:
    """Norm then activation ("bn_relu"), or activation then norm ("relu_bn"); ``norm`` as in ``make_norm``."""
    bn, act = make_norm(norm, channels, groups), Activation(activation)
    return nn.Sequential(bn, act) if order == "bn_relu" else nn.Sequential(act, bn)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: out = pre(x); shortcut = proj(out) or x; conv1x1, pre, conv3x3, pre, conv1x1.

    ``order`` picks BN-ReLU-Conv (ResNet-V2) or ReLU-BN-Conv. Convs are He-initialised for the activation
    (N(0, 2/fan_in) for relu). The projection sees the normalised, activated input, as in ResNet-V2.
    """

    spp_residual = "conv3"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        order: str,
        activation: str,
        norm: str = "bn",
        groups: int = DEFAULT_GROUPS,
    ) -> None:
        super().__init__()
        width = out_ch // 4
        gain = second_moment_gain(activation)
        self.pre1 = norm_act(in_ch, order, activation, norm, groups)
        self.conv1 = he_conv(in_ch, width, 1, gain=gain)
        self.pre2 = norm_act(width, order, activation, norm, groups)
        self.conv2 = he_conv(width, width, 3, stride, gain=gain)
        self.pre3 = norm_act(width, order, activation, norm, groups)
        self.conv3 = he_conv(width, out_ch, 1, gain=gain)
        projecting = stride != 1 or in_ch != out_ch
        self.shortcut = he_conv(in_ch, out_ch, 1, stride, gain=gain) if projecting else None

    def forward(self, x):
        out = self.pre1(x)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.pre2(out))
        out = self.conv3(self.pre3(out))
        return out + shortcut


def preact_resnet(
    layers: Sequence[int],
    *,
    order: str,
    width: float = 1.0,
    in_chans: int = 3,
    activation: str = "relu",
    num_classes: int = 1000,
    norm: str = "bn",
    groups: int | None = None,
) -> ResNet:
    """A pre-activation ResNet (Norm-ReLU-Conv or ReLU-Norm-Conv) with He init.

    ``norm``: ``bn`` (default), ``gn``, ``ln``, ``in`` or ``none`` (see ``make_norm``); ``groups`` (GroupNorm
    only, default 32): a layer with C channels gets ``min(groups, C)`` groups, which must divide C.
    """
    if order not in ("bn_relu", "relu_bn"):
        raise ValueError(f"order must be 'bn_relu' or 'relu_bn', not {order!r}")
    if norm not in NORMS:
        raise SppError(f"unknown norm {norm!r}{close_matches(norm, NORMS)}; known: {', '.join(NORMS)}")
    if groups is not None and norm != "gn":
        raise SppError(f"groups={groups} applies to norm=gn only (this model has norm={norm})")
    groups = DEFAULT_GROUPS if groups is None else groups
    stage_outs = [scaled(c, width) for c in STAGE_CHANNELS[: len(layers)]]
    if norm == "gn":
        # every normalised layer: block inputs (the stem's and each stage's output) and bottleneck widths
        check_groups([scaled(STEM_CHANNELS, width), *stage_outs, *(c // 4 for c in stage_outs)], groups)
    stem = he_conv(in_chans, scaled(STEM_CHANNELS, width), 7, stride=2)

    def make_block(in_ch: int, out_ch: int, stride: int, index: int) -> nn.Module:
        return PreActBottleneck(in_ch, out_ch, stride, order=order, activation=activation, norm=norm, groups=groups)

    final = norm_act(stage_outs[-1], order, activation, norm, groups)
    return ResNet(layers, make_block, stem, final, width=width, num_classes=num_classes)

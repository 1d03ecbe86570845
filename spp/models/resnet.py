"""The ResNet skeleton shared by every reference family, and the two BatchNorm families.

Stem: 7x7/2 conv to 64 channels, 3x3/2 max-pool. Stages of bottleneck blocks with outputs 256/512/1024/2048,
bottleneck width out/4, the stride on the 3x3 conv, and a 1x1 projection shortcut (carrying the stride) on each
stage's first block. Blocks name their residual-branch output in ``spp_residual`` so the recorder need not guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from spp.models.activations import Activation, second_moment_gain
from spp.models.layers import he_conv
from spp.models.registry import DEPTHS  # noqa: F401  (re-exported)

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


def norm_act(channels: int, order: str, activation: str) -> nn.Sequential:
    """BN then activation ("bn_relu"), or activation then BN ("relu_bn")."""
    bn, act = nn.BatchNorm2d(channels), Activation(activation)
    return nn.Sequential(bn, act) if order == "bn_relu" else nn.Sequential(act, bn)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: out = pre(x); shortcut = proj(out) or x; conv1x1, pre, conv3x3, pre, conv1x1.

    ``order`` picks BN-ReLU-Conv (ResNet-V2) or ReLU-BN-Conv. Convs are He-initialised for the activation
    (N(0, 2/fan_in) for relu). The projection sees the normalised, activated input, as in ResNet-V2.
    """

    spp_residual = "conv3"

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, order: str, activation: str) -> None:
        super().__init__()
        width = out_ch // 4
        gain = second_moment_gain(activation)
        self.pre1 = norm_act(in_ch, order, activation)
        self.conv1 = he_conv(in_ch, width, 1, gain=gain)
        self.pre2 = norm_act(width, order, activation)
        self.conv2 = he_conv(width, width, 3, stride, gain=gain)
        self.pre3 = norm_act(width, order, activation)
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
) -> ResNet:
    """A pre-activation ResNet (BN-ReLU-Conv or ReLU-BN-Conv) with He init."""
    if order not in ("bn_relu", "relu_bn"):
        raise ValueError(f"order must be 'bn_relu' or 'relu_bn', not {order!r}")
    stem = he_conv(in_chans, scaled(STEM_CHANNELS, width), 7, stride=2)

    def make_block(in_ch: int, out_ch: int, stride: int, index: int) -> nn.Module:
        return PreActBottleneck(in_ch, out_ch, stride, order=order, activation=activation)

    final = norm_act(scaled(STAGE_CHANNELS[len(layers) - 1], width), order, activation)
    return ResNet(layers, make_block, stem, final, width=width, num_classes=num_classes)

"""NF-ResNet: a normaliser-free ResNet whose signal is kept in check analytically (Brock, De, Smith 2021).

Block: x_{l+1} = x_l + alpha * f(x_l / beta_l), beta_l = sqrt(expected Var(x_l)). The expected variance grows by
alpha^2 per block and is reset to 1 + alpha^2 after a stage's first block, whose projection shortcut also sees
x / beta. With Scaled WS (``ws=True``) every conv is variance-preserving; without it (``ws=False``, plain He-init
convs) the activation's positive mean leaks through the weights and the squared channel mean grows with depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from spp.models.activations import Activation, gamma, second_moment_gain
from spp.models.layers import ScaledStdConv2d, he_conv
from spp.models.resnet import STEM_CHANNELS, ResNet, scaled


class NFBottleneck(nn.Module):
    """out = act(x / beta); shortcut = proj(out) or x; branch = conv1x1, act, conv3x3, act, conv1x1;
    return shortcut + alpha * branch. The branch is live at init (no zero-init gain), so the SPP shows the signal.

    ``spp_expected_var`` is the variance the beta bookkeeping expects at this block's output.
    """

    spp_residual = "conv3"

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        alpha: float,
        beta: float,
        expected_var: float,
        activation: str,
        ws: bool,
    ) -> None:
        super().__init__()
        width = out_ch // 4
        conv: Callable[..., nn.Conv2d] = (
            partial(ScaledStdConv2d, gamma=gamma(activation))
            if ws
            else partial(he_conv, gain=second_moment_gain(activation))
        )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.spp_expected_var = float(expected_var)
        self.act1 = Activation(activation)
        self.conv1 = conv(in_ch, width, 1)
        self.act2 = Activation(activation)
        self.conv2 = conv(width, width, 3, stride)
        self.act3 = Activation(activation)
        self.conv3 = conv(width, out_ch, 1)
        projecting = stride != 1 or in_ch != out_ch
        self.shortcut = conv(in_ch, out_ch, 1, stride) if projecting else None

    def forward(self, x):
        out = self.act1(x / self.beta)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        out = self.conv3(self.act3(out))
        return shortcut + self.alpha * out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}"


def nf_resnet(
    layers: Sequence[int],
    *,
    width: float = 1.0,
    in_chans: int = 3,
    activation: str = "relu",
    alpha: float = 0.2,
    ws: bool = True,
    num_classes: int = 1000,
) -> ResNet:
    """An NF-ResNet with Scaled WS (or plain He-init convs with ``ws=False``)."""
    stem = (
        ScaledStdConv2d(in_chans, scaled(STEM_CHANNELS, width), 7, stride=2)
        if ws
        else he_conv(in_chans, scaled(STEM_CHANNELS, width), 7, stride=2, gain=1.0)
    )
    expected = {"var": 1.0}

    def make_block(in_ch: int, out_ch: int, stride: int, index: int) -> nn.Module:
        beta = math.sqrt(expected["var"])
        if index == 0:
            expected["var"] = 1.0
        expected["var"] += alpha**2
        return NFBottleneck(
            in_ch, out_ch, stride, alpha=alpha, beta=beta, expected_var=expected["var"], activation=activation, ws=ws
        )

    model = ResNet(layers, make_block, stem, Activation(activation), width=width, num_classes=num_classes)
    model.spp_stem_expected_var = 1.0  # type: ignore[assignment]  # nn.Module's __setattr__ stubs expect tensors
    return model

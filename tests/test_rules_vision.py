"""Discovery on third-party families: every tap must read the right tensors, checked on tensors captured
independently, and the recorder must read the same numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spp import hooks
from spp.discovery import find_taps
from spp.rules.common import ZERO_BRANCH
from spp.taps import Difference, Site
from tests.helpers import (
    blocks,
    capture_sites,
    check_recorder_reads_the_same,
    image,
    liven,
    tap_sites,
    timm_model,
    tv_model,
    verify,
)
from tests.toys import Chain


@pytest.mark.parametrize(
    ("source", "name", "kwargs", "count", "rule"),
    [
        ("timm", "resnet50", {}, 16, "timm ResNet Bottleneck"),
        ("timm", "resnet18", {}, 8, "timm ResNet BasicBlock"),
        ("timm", "resnetv2_50", {}, 16, "timm ResNetV2 PreActBottleneck"),
        ("timm", "nf_resnet50", {}, 16, "timm NormFreeBlock"),
        ("timm", "convnext_atto", {}, 12, "timm ConvNeXtBlock"),
        ("timm", "vit_tiny_patch16_224", {}, 24, "timm ViT Block"),
        ("timm", "deit_tiny_patch16_224", {}, 24, "timm ViT Block"),
        ("timm", "swin_tiny_patch4_window7_224", {}, 24, "timm Swin block"),
        ("tv", "resnet18", {}, 8, "torchvision ResNet BasicBlock"),
        ("tv", "resnet50", {}, 16, "torchvision ResNet Bottleneck"),
    ],
)
def test_block_counts_match_the_architecture(source, name, kwargs, count, rule):
    model = timm_model(name, **kwargs) if source == "timm" else tv_model(name, **kwargs)
    taps = find_taps(model)
    assert len(taps) - 1 == count
    assert all(t.rule.startswith(rule) for t in blocks(taps))
    per_block = 2 if "ViT" in rule or "Swin" in rule else 1
    assert len({t.module for t in blocks(taps)}) == count // per_block


def post_act(tap, block, v):
    x = v[Site(tap.module, "input")]
    shortcut = block.downsample(x) if block.downsample is not None else x
    return F.relu(v[tap.residual] + shortcut)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("tv", "resnet18"),
        ("tv", "resnet50"),
        ("timm", "resnet18"),
        ("timm", "resnet50"),
        ("timm", "seresnet18"),
    ],
)
def test_resnet_branch_plus_shortcut_is_the_output(source, name):
    model = liven(tv_model(name) if source == "tv" else timm_model(name))
    taps = verify(model, image(), post_act)
    last = "bn2" if name.endswith("18") else "bn3"
    want = "se" if name.startswith("se") else last
    assert all(t.residual == Site(f"{t.module}.{want}") for t in blocks(taps))


def test_resnet_check_rejects_a_neighbouring_site():
    """The identity above is specific: the pre-BN conv output (one site earlier) does not satisfy it."""
    model = liven(tv_model("resnet18"))
    taps = find_taps(model)
    tap = taps[1]
    values = capture_sites(model, {*tap_sites(taps), Site(f"{tap.module}.conv2")}, image())
    block = dict(model.named_modules())[tap.module]
    neighbour = F.relu(values[Site(f"{tap.module}.conv2")] + values[Site(tap.module, "input")])
    assert not torch.allclose(neighbour, values[tap.output], atol=1e-3)
    assert torch.allclose(post_act(tap, block, values), values[tap.output], atol=1e-5)


def test_zero_init_last_bn_is_noted():
    model = timm_model("resnet18")  # timm zero-inits bn2.weight: the branch is exactly zero
    taps = find_taps(model)
    assert all(t.note == ZERO_BRANCH.format(why="timm zero_init_last: bn2.weight is 0") for t in blocks(taps))
    rec = hooks.record(model, image(), mode="train", taps=taps)
    assert all(r["res_avg_var"] == 0.0 for r in rec.rows[1:])
    assert all(t.note == "" for t in blocks(find_taps(liven(model))))


def pre_act(tap, block, v):
    x = v[Site(tap.module, "input")]
    shortcut = block.downsample(block.norm1(x)) if block.downsample is not None else x
    return v[tap.residual] + shortcut


@pytest.mark.parametrize(("name", "last"), [("resnetv2_18", "conv2"), ("resnetv2_50", "conv3")])
def test_resnetv2_preact_branch_plus_shortcut_is_the_output(name, last):
    taps = verify(liven(timm_model(name)), image(), pre_act)
    assert all(t.residual == Site(f"{t.module}.{last}") for t in blocks(taps))


def test_resnetv2_v1_bottleneck():
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    model = liven(
        ResNetV2(layers=(2, 1), channels=(64, 128), stem_chs=32, preact=False, bottle_ratio=0.5, num_classes=5).eval()
    )

    def expect(tap, block, v):
        x = v[Site(tap.module, "input")]
        shortcut = block.downsample(x) if block.downsample is not None else x
        return F.relu(v[tap.residual] + shortcut)

    taps = verify(model, image(), expect)
    assert len(taps) - 1 == 3 and all(t.residual.module.endswith("norm3") for t in blocks(taps))


def normfree(tap, block, v):
    x = v[Site(tap.module, "input")]
    pre = block.act1(x) * block.beta
    shortcut = block.downsample(pre) if block.downsample is not None else x
    scale = block.alpha
    if tap.residual.module.endswith("attn_last"):
        scale = scale * block.attn_gain
    if block.skipinit_gain is not None:
        scale = scale * block.skipinit_gain
    return v[tap.residual] * scale + shortcut


def test_nf_resnet_zero_gain_is_noted_and_branch_is_exact_once_live():
    model = timm_model("nf_resnet26")
    taps = find_taps(model)
    assert len(taps) - 1 == 8
    note = "residual branch is zero at init (timm zero-inits the last conv gain): a flat SPP is the truth, not a bug"
    assert all(t.note == note for t in blocks(taps))
    rec = hooks.record(model, image(), mode="eval", taps=taps)
    assert all(r["res_avg_var"] == 0.0 for r in rec.rows[1:])  # the truth at init
    liven(model)  # random conv3 gains: now the branch is live and the identity is meaningful
    taps = verify(model, image(), normfree)
    assert all(t.residual == Site(f"{t.module}.conv3") for t in blocks(taps))


def test_nfnet_attention_and_skipinit():
    from timm.layers import ScaledStdConv2d, get_act_layer
    from timm.layers.create_attn import get_attn
    from timm.models.nfnet import NormFreeBlock

    torch.manual_seed(0)
    act = get_act_layer("gelu")
    kw = dict(
        alpha=0.2,
        reg=False,
        skipinit=True,
        attn_layer=get_attn("se"),
        act_layer=act,
        conv_layer=ScaledStdConv2d,
    )
    model = Chain(
        NormFreeBlock(8, 16, stride=2, beta=1.0, **kw),
        NormFreeBlock(16, 16, beta=1 / 1.02**0.5, **kw),
        stem=nn.Conv2d(3, 8, 3, padding=1),
    ).eval()
    taps = find_taps(model)
    assert all("skipinit gain is 0" in t.note for t in blocks(taps))
    liven(model)
    taps = verify(model, image(size=16), normfree)
    assert [t.residual for t in blocks(taps)] == [Site("blocks.0.attn_last"), Site("blocks.1.attn_last")]
    nfnet_taps = blocks(find_taps(timm_model("test_nfnet")))  # timm's own NFNet config: SE after conv3
    assert len(nfnet_taps) == 4 and all(t.residual.module.endswith("attn_last") for t in nfnet_taps)


def convnext(tap, block, v):
    x = v[Site(tap.module, "input")]
    if isinstance(tap.residual, Difference):  # channels-last mlp: read as output - shortcut, after gamma
        return v[tap.residual.minuend] - v[tap.residual.subtrahend] + block.shortcut(x)
    branch = v[tap.residual]
    if branch.shape[1] != x.shape[1] and branch.shape[-1] == block.gamma.numel():  # NHWC mlp output
        branch = branch.permute(0, 3, 1, 2)
    return branch * block.gamma.reshape(1, -1, 1, 1) + block.shortcut(x)


def test_convnext_branch_before_layer_scale():
    model = timm_model("convnext_atto")
    taps = find_taps(model)
    assert all("layer scale gamma is 1e-06" in t.note for t in blocks(taps))
    taps = verify(liven(model), image(), convnext)
    assert all(t.residual == Site(f"{t.module}.mlp") for t in blocks(taps))


def test_convnext_channels_last_mlp():
    taps = verify(liven(timm_model("convnext_atto", conv_mlp=False)), image(), convnext)
    assert len(taps) - 1 == 12
    # The branch is read before gamma, on its own (last) channel axis, with one variance per block channel.
    assert all(t.residual == Site(f"{t.module}.mlp") and t.residual_channel_dim == -1 for t in blocks(taps))


def vit(tap, block, v):
    x = v[Site(tap.module, "input")]
    if tap.name.endswith(".attn"):
        return x + block.ls1(v[tap.residual])
    mid = v[Site(f"{tap.module}.norm2", "input")]
    return mid + block.ls2(v[tap.residual])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_two_taps_per_block(name):
    model = liven(timm_model(name, img_size=32, patch_size=8, init_values=1e-5))  # with LayerScale
    taps = verify(model, image(), vit)
    assert len(taps) - 1 == 24
    assert [t.name for t in taps[1:3]] == ["blocks.0.attn", "blocks.0.mlp"]
    assert {t.module for t in taps[1:3]} == {"blocks.0"} and all(t.channel_dim == -1 for t in taps[1:])
    assert taps[1].output == Site("blocks.0.norm2", "input") and taps[1].residual == Site("blocks.0.attn")
    assert taps[2].output == Site("blocks.0") and taps[2].residual == Site("blocks.0.mlp")


def test_vit_res_post_block():
    from timm.models.vision_transformer import ResPostBlock

    model = liven(timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, block_fn=ResPostBlock))

    def expect(tap, block, v):
        x = v[Site(tap.module, "input")]
        if tap.name.endswith(".attn"):
            return x + v[tap.residual]
        return v[Site(f"{tap.module}.mlp", "input")] + v[tap.residual]

    taps = verify(model, image(), expect)
    assert [t.residual.module for t in blocks(taps)] == [
        "blocks.0.norm1",
        "blocks.0.norm2",
        "blocks.1.norm1",
        "blocks.1.norm2",
    ]


def test_swin_taps_hold_the_branch_up_to_window_order():
    model = liven(
        timm_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=4,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(1, 2),
        )
    )
    x = image()
    taps = find_taps(model)
    assert len(taps) - 1 == 8 and all(t.channel_dim == -1 for t in taps[1:])
    values = capture_sites(model, tap_sites(taps), x)
    for tap in blocks(taps):
        inp = values[Site(tap.module, "input")]
        c = inp.shape[-1]
        if tap.name.endswith(".attn"):
            added = values[tap.output] - inp.reshape(inp.shape[0], -1, c)
        else:
            added = values[tap.output].reshape(inp.shape[0], -1, c) - values[Site(f"{tap.module}.norm2", "input")]
        branch = values[tap.residual].reshape(-1, c)
        # window partition / roll permute positions: same multiset of values per channel
        torch.testing.assert_close(added.reshape(-1, c).sort(dim=0).values, branch.sort(dim=0).values)
    check_recorder_reads_the_same(model, taps, values, x)












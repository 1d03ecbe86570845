"""Discovery on third-party families: every tap must read the real branch, proven by rebuilding the block output
from it (branch * scale + shortcut, then the final activation) on random-init models, tiny inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import spp.discovery as discovery
from spp import hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.rules.common import ZERO_BRANCH
from spp.taps import Difference, Site
from tests.helpers_families import (
    ActAfterFunctionalToy,
    Chain,
    FunctionalToy,
    InplaceToy,
    NamedShortcutToy,
    NotResidualToy,
    ParallelHeadsToy,
    PooledShortcutToy,
    PostActProjToy,
    PreActToy,
    ScaledToy,
    TwoAddToy,
    UntraceableToy,
    capture,
    channel_stats,
    liven,
    one_thread,  # noqa: F401  (autouse fixture)
    residual_value,
    tap_sites,
)


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def tv_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def image(n: int = 2, size: int = 32, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(1))


def blocks(taps):
    return taps[1:]


def check_recorder_reads_the_same(model: nn.Module, taps, values, x) -> None:
    """The recorder's statistics at every tap equal the direct ones on the tensors our own hooks captured."""
    rec = hooks.record(model, x, mode="eval", taps=taps)
    for tap, row in zip(taps, rec.rows, strict=True):
        out = values[tap.output]
        axis = tap.channel_dim if tap.channel_dim is not None else (-1 if out.ndim == 3 else 1)
        _, var = channel_stats(out, axis)
        assert math.isclose(row["avg_var"], var, rel_tol=1e-6), (tap.name, row["avg_var"], var)
        if tap.residual is not None:
            r = residual_value(tap, values)
            axis = tap.channel_dim if tap.channel_dim is not None else (-1 if r.ndim == 3 else 1)
            if getattr(tap, "residual_channel_dim", None) is not None:
                axis = tap.residual_channel_dim  # e.g. ConvNeXt's channels-last mlp under an NCHW block
            _, rvar = channel_stats(r, axis)
            assert math.isclose(row["res_avg_var"], rvar, rel_tol=1e-5, abs_tol=1e-12), (tap.name, rvar)


def verify(model: nn.Module, x: torch.Tensor, expect) -> list:
    """For every tap, ``expect(tap, block, values)`` rebuilds the tensor at the tap's output site from its branch."""
    taps = find_taps(model)
    values = capture(model, tap_sites(taps), x)
    modules = dict(model.named_modules())
    for tap in blocks(taps):
        rebuilt = expect(tap, modules[tap.module], values)
        torch.testing.assert_close(rebuilt, values[tap.output], msg=lambda m, t=tap: f"{t.name}: {m}")
    check_recorder_reads_the_same(model, taps, values, x)
    return taps


# ---- block counts -----------------------------------------------------------------------------------------------


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


def test_stages_follow_the_containers():
    taps = find_taps(timm_model("resnet50"))
    assert [t.stage for t in taps] == [0] + [1] * 3 + [2] * 4 + [3] * 6 + [4] * 3


# ---- torchvision and timm ResNets (post-activation) ---------------------------------------------------------------


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
    values = capture(model, {*tap_sites(taps), Site(f"{tap.module}.conv2")}, image())
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


# ---- timm ResNetV2 ------------------------------------------------------------------------------------------------


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


# ---- timm NormFree -----------------------------------------------------------------------------------------------


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


# ---- timm ConvNeXt ------------------------------------------------------------------------------------------------


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


# ---- timm ViT / DeiT / Swin --------------------------------------------------------------------------------------


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
    assert {t.module for t in taps[1:3]} == {"blocks.0"} and all(t.channel_dim == -1 for t in taps)
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
    assert len(taps) - 1 == 8 and all(t.channel_dim == -1 for t in taps)
    values = capture(model, tap_sites(taps), x)
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


# ---- the traced fallback ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "site", "label"),
    [
        (PreActToy(), "blocks.0.branch", "fallback (traced add): branch = branch"),
        (PostActProjToy(), "blocks.0.bn", "fallback (traced add): branch = bn"),
        (FunctionalToy(), None, "fallback (traced add): output - input (after its scaling)"),
    ],
)
def test_fallback_on_conv_toys(block, site, label):
    model = Chain(block).eval()
    x = image(size=8, chans=4)
    taps = find_taps(model)
    assert len(taps) == 2 and taps[1].rule == label
    tap = taps[1]
    values = capture(model, tap_sites(taps), x)
    inp = values[Site("blocks.0", "input")]
    if site is None:
        assert tap.residual == Difference(Site("blocks.0"), Site("blocks.0", "input"))
        expected_branch = 0.5 * F.relu(block.conv(inp))
    else:
        assert tap.residual == Site(site)
        expected_branch = dict(model.named_modules())[site](
            block.conv(inp) if isinstance(block, PostActProjToy) else inp
        )
    torch.testing.assert_close(residual_value(tap, values), expected_branch)
    check_recorder_reads_the_same(model, taps, values, x)


def test_fallback_named_shortcut_decides_between_equal_paths():
    model = Chain(NamedShortcutToy()).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.stack") and taps[1].rule == "fallback (traced add): branch = stack"
    x = image(size=8, chans=4)
    values = capture(model, tap_sites(taps), x)
    torch.testing.assert_close(values[Site("blocks.0.stack")] + model.blocks[0].shortcut(x), values[taps[1].output])


def test_difference_survives_an_in_place_add():
    model = Chain(InplaceToy(), stem=nn.Conv2d(4, 4, 1)).eval()
    taps = find_taps(model)
    assert taps[1].residual == Difference(Site("blocks.0"), Site("blocks.0", "input"))
    x = image(size=8, chans=4)
    with torch.no_grad():
        branch = 0.5 * F.relu(model.blocks[0].conv(model.stem(x)))
    rec = hooks.record(model, x, mode="eval", taps=taps)
    assert math.isclose(rec.rows[1]["res_avg_var"], channel_stats(branch, 1)[1], rel_tol=1e-5)


def test_fallback_two_additions_on_tokens():
    model = Chain(TwoAddToy(), TwoAddToy()).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    taps = find_taps(model)
    assert [t.name for t in taps] == [
        "stem",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]
    assert taps[1].output == Site("blocks.0.norm2", "input") and taps[2].output == Site("blocks.0")
    assert all(t.channel_dim == -1 for t in taps) and taps[1].rule.endswith("channels last")
    values = capture(model, tap_sites(taps), x)
    for tap in blocks(taps):
        shortcut = Site(tap.module, "input") if tap.name.endswith("attn") else Site(f"{tap.module}.norm2", "input")
        torch.testing.assert_close(values[shortcut] + values[tap.residual], values[tap.output])
    check_recorder_reads_the_same(model, taps, values, x)


def test_fallback_reads_the_branch_before_a_parameter_scale():
    model = Chain(ScaledToy()).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.mlp") and "before its scaling" in taps[1].rule
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))  # 2-D (B, C)
    values = capture(model, tap_sites(taps), x)
    torch.testing.assert_close(values[Site("blocks.0")], x + model.blocks[0].gamma * values[Site("blocks.0.mlp")])


@pytest.mark.parametrize(
    "toy", [NotResidualToy, UntraceableToy, ActAfterFunctionalToy, ParallelHeadsToy, PooledShortcutToy]
)
def test_fallback_claims_nothing_it_cannot_prove(toy):
    model = Chain(toy(), toy()).eval()
    with pytest.raises(SppError, match="no residual blocks found in Chain; name them with --blocks"):
        find_taps(model)


@pytest.mark.parametrize(("source", "name"), [("tv", "resnet18"), ("timm", "vit_tiny_patch16_224")])
def test_fallback_agrees_with_the_family_rules(source, name):
    """With the family rules switched off, the traced fallback finds the same blocks and the same sites."""
    model = tv_model(name) if source == "tv" else timm_model(name, img_size=32, patch_size=8, depth=3)
    specific = find_taps(model)
    traced = find_taps(model, rules=[r for r in discovery.DEFAULT_RULES if r.name in ("spp", "fallback (traced add)")])
    assert all(t.rule.startswith("fallback (traced add)") for t in blocks(traced))
    assert [(t.module, t.output, t.residual, t.channel_dim) for t in traced] == [
        (t.module, t.output, t.residual, t.channel_dim) for t in specific
    ]


def test_fallback_finds_blocks_of_unknown_families():
    """torchvision MobileNetV2 has no family rule: its 10 residual InvertedResiduals are found by tracing."""
    model = tv_model("mobilenet_v2")
    taps = find_taps(model)
    with_skip = [n for n, m in model.named_modules() if getattr(m, "use_res_connect", False)]
    assert [t.module for t in blocks(taps)] == with_skip and len(with_skip) == 10
    x = image()
    values = capture(model, tap_sites(taps), x)
    for tap in blocks(taps):
        torch.testing.assert_close(values[Site(tap.module, "input")] + values[tap.residual], values[tap.output])


# ---- overrides -----------------------------------------------------------------------------------------------


def test_blocks_patterns_and_residual_tap_override():
    model = tv_model("resnet18")
    taps = find_taps(model, blocks=["layer2.*"], residual_tap="conv2")
    assert [t.module for t in taps[1:]] == ["layer2.0", "layer2.1"]
    assert [t.residual for t in taps[1:]] == [Site("layer2.0.conv2"), Site("layer2.1.conv2")]
    assert taps[1].rule == "--blocks + torchvision ResNet BasicBlock: branch = bn2, --residual-tap conv2"
    x = image()
    values = capture(model, tap_sites(taps), x)
    check_recorder_reads_the_same(model, taps, values, x)
    with pytest.raises(SppError, match="matched no module"):
        find_taps(model, blocks=["nothing*"])
    with pytest.raises(SppError, match="has no child 'conv9'"):
        find_taps(model, residual_tap="conv9")


def test_blocks_pattern_on_unprovable_modules_reads_output_minus_input():
    model = Chain(UntraceableToy(), UntraceableToy()).eval()
    taps = find_taps(model, blocks=["blocks.?"])
    assert [t.rule for t in taps[1:]] == ["--blocks (output - input)"] * 2
    x = image(size=8, chans=4).abs() + 0.1  # positive sum: the x + conv(x) path
    values = capture(model, tap_sites(taps), x)
    torch.testing.assert_close(residual_value(taps[1], values), model.blocks[0].conv(values[Site("blocks.0", "input")]))
    check_recorder_reads_the_same(model, taps, values, x)


def test_torchscript_is_refused_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still loadable
        scripted = torch.jit.script(Chain(PreActToy()))
    with pytest.raises(SppError, match="TorchScript models run their forward in C\\+\\+"):
        find_taps(scripted)


# ---- channel layouts ----------------------------------------------------------------------------------------


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

"""Discovery rules for vision families whose code spp knows: torchvision ResNets and timm's ResNet, ResNetV2,
NormFreeNet, ConvNeXt, ViT and Swin blocks.

Each rule maps ``(name, module)`` to taps or ``None``. A tap's residual site is the branch *before* anything
scales it (skip-init gain, alpha, layer scale, drop path) and before it is added to the shortcut; for
post-activation blocks (ResNet v1) that is the last norm of the branch (or the SE module after it), read
before the final ReLU. Classes are recognised by their defining module and name along the MRO, so importing
this module imports neither timm nor torchvision. Blocks no rule knows go to ``spp.rules.traced``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from spp.rules.common import ZERO_BRANCH, all_zero, child, is_class, make_tap, rel
from spp.taps import Site, Tap


def _shortcut(name: str, module: nn.Module, projection: str) -> Site:
    """The block's input, or its projection child's output when it has one."""
    return Site(rel(name, projection)) if getattr(module, projection, None) is not None else Site(name, "input")


def _relu_after(module: nn.Module, act: str) -> str:
    """"relu" when the block's post-addition activation is a plain ReLU (the residual identity is then checkable)."""
    return "relu" if isinstance(getattr(module, act, None), nn.ReLU) else ""


# ---- torchvision -------------------------------------------------------------------------------------------


def torchvision_resnet(name: str, module: nn.Module) -> list[Tap] | None:
    """torchvision BasicBlock / Bottleneck: relu(bn2|bn3(...) + shortcut); the branch is the last BN."""
    if is_class(module, "torchvision.models.resnet.BasicBlock"):
        last = "bn2"
    elif is_class(module, "torchvision.models.resnet.Bottleneck"):
        last = "bn3"
    else:
        return None
    bn = child(module, last)
    note = ZERO_BRANCH.format(why=f"zero_init_residual: {last}.weight is 0") if all_zero(getattr(bn, "weight", None)) \
        else ""
    tap = make_tap(name, Site(rel(name, last)), f"torchvision ResNet {type(module).__name__}: branch = {last}",
                   note=note, shortcut=_shortcut(name, module, "downsample"))
    return [_post_relu(tap, module, "relu")]


def _post_relu(tap: Tap, module: nn.Module, act: str) -> Tap:
    return replace(tap, post_activation=_relu_after(module, act))


# ---- timm --------------------------------------------------------------------------------------------------


def timm_resnet(name: str, module: nn.Module) -> list[Tap] | None:
    """timm ResNet v1: conv..bn_last -> se? -> drop_path -> += shortcut -> act; branch = se or bn_last."""
    if is_class(module, "timm.models.resnet.BasicBlock"):
        last = "bn2"
    elif is_class(module, "timm.models.resnet.Bottleneck"):
        last = "bn3"
    else:
        return None
    site = "se" if getattr(module, "se", None) is not None else last
    bn = child(module, last)
    note = ZERO_BRANCH.format(why=f"timm zero_init_last: {last}.weight is 0") \
        if all_zero(getattr(bn, "weight", None)) else ""
    tap = make_tap(name, Site(rel(name, site)), f"timm ResNet {type(module).__name__}: branch = {site}", note=note,
                   shortcut=_shortcut(name, module, "downsample"))
    return [_post_relu(tap, module, "act3" if last == "bn3" else "act2")]


_RESNETV2_LAST = {
    "timm.models.resnetv2.PreActBasic": "conv2",
    "timm.models.resnetv2.PreActBottleneck": "conv3",
    "timm.models.resnetv2.Bottleneck": "norm3",
}


def timm_resnetv2(name: str, module: nn.Module) -> list[Tap] | None:
    """timm ResNetV2: pre-activation blocks end their branch in a conv, the v1.5 Bottleneck in norm3."""
    last = next((v for k, v in _RESNETV2_LAST.items() if is_class(module, k)), None)
    if last is None:
        return None
    layer = child(module, last)
    note = ZERO_BRANCH.format(why=f"timm zero_init_last: {last}.weight is 0") \
        if all_zero(getattr(layer, "weight", None)) else ""
    tap = make_tap(name, Site(rel(name, last)), f"timm ResNetV2 {type(module).__name__}: branch = {last}", note=note,
                   shortcut=_shortcut(name, module, "downsample"))
    return [_post_relu(tap, module, "act3") if last == "norm3" else tap]


def timm_normfree(name: str, module: nn.Module) -> list[Tap] | None:
    """timm NormFreeBlock (NF-ResNet, NFNet, NF-RegNet): out = shortcut + alpha * skipinit_gain * branch.

    The branch is conv3's output, or attn_last's when the block has one (it is then multiplied by the constant
    attn_gain, then drop_path, skipinit_gain and alpha, none of which the tap sees).
    """
    if not is_class(module, "timm.models.nfnet.NormFreeBlock"):
        return None
    site = "attn_last" if getattr(module, "attn_last", None) is not None else "conv3"
    notes = []
    if all_zero(getattr(child(module, "conv3"), "gain", None)):
        notes.append(ZERO_BRANCH.format(why="timm zero-inits the last conv gain"))
    if all_zero(getattr(module, "skipinit_gain", None)):
        notes.append("skipinit gain is 0 at init: the branch is live but adds nothing; the output SPP is flat")
    scale = "attn_gain, " if site == "attn_last" else ""
    return [make_tap(name, Site(rel(name, site)), f"timm NormFreeBlock: branch = {site} (before {scale}skipinit gain, "
                     "alpha)", note="; ".join(notes), shortcut=_shortcut(name, module, "downsample"))]


def timm_convnext(name: str, module: nn.Module) -> list[Tap] | None:
    """timm ConvNeXtBlock: shortcut(x) + drop_path(gamma * mlp(norm(conv_dw(x)))).

    ``gamma`` is a Parameter multiplied inline, so the last module output before it is the mlp's. With
    ``conv_mlp=True`` that is NCHW like the block output; otherwise the mlp runs channels-last (B, H, W, C) and
    the branch is read on its own channel axis (``residual_channel_dim=-1``).
    """
    if not is_class(module, "timm.models.convnext.ConvNeXtBlock"):
        return None
    gamma = getattr(module, "gamma", None)
    note = ""
    if isinstance(gamma, torch.Tensor) and gamma.numel():
        top = float(gamma.detach().abs().max())
        if top < 1e-3:
            note = f"layer scale gamma is {top:.0e}: the branch barely moves the output"
    conv_mlp = getattr(module, "use_conv_mlp", True)
    layout = "" if conv_mlp else ", channels-last"
    tap = make_tap(name, Site(rel(name, "mlp")), f"timm ConvNeXtBlock: branch = mlp{layout} (before gamma, drop_path)",
                   note=note, shortcut=Site(rel(name, "shortcut")))
    return [tap if conv_mlp else replace(tap, residual_channel_dim=-1)]


def timm_vit(name: str, module: nn.Module) -> list[Tap] | None:
    """timm ViT / DeiT Block: two residual additions, one tap each; tokens (B, N, C), channels last.

    Pre-norm ``Block``: x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))). The first addition's result
    is what norm2 receives. Post-norm ``ResPostBlock``: x = x + norm1(attn(x)); x = x + norm2(mlp(x)).
    """
    if is_class(module, "timm.models.vision_transformer.Block"):
        attn_res, mlp_res, mid = "attn", "mlp", "norm2"
        kind = "Block"
    elif is_class(module, "timm.models.vision_transformer.ResPostBlock"):
        attn_res, mlp_res, mid = "norm1", "norm2", "mlp"
        kind = "ResPostBlock"
    else:
        return None
    between = Site(rel(name, mid), "input")
    return [
        make_tap(name, Site(rel(name, attn_res)), f"timm ViT {kind}: attn branch = {attn_res} (before ls1, drop_path1)",
                 output=between, suffix=".attn", channel_dim=-1, shortcut=Site(name, "input"), branch="attn"),
        make_tap(name, Site(rel(name, mlp_res)), f"timm ViT {kind}: mlp branch = {mlp_res} (before ls2, drop_path2)",
                 suffix=".mlp", channel_dim=-1, shortcut=between, branch="mlp"),
    ]


def timm_swin(name: str, module: nn.Module) -> list[Tap] | None:
    """timm SwinTransformerBlock (NHWC): x + attn branch, then x + mlp branch; channels last throughout.

    The attention branch is read at ``attn`` (WindowAttention), in window order: a permutation of the
    positions the block adds, so per-channel statistics agree unless the map is padded to the window size.
    """
    if not is_class(module, "timm.models.swin_transformer.SwinTransformerBlock"):
        return None
    between = Site(rel(name, "norm2"), "input")
    return [
        make_tap(name, Site(rel(name, "attn")), "timm Swin block: attn branch = attn (window order, before drop_path1)",
                 output=between, suffix=".attn", channel_dim=-1, shortcut=Site(name, "input"), branch="attn"),
        make_tap(name, Site(rel(name, "mlp")), "timm Swin block: mlp branch = mlp (before drop_path2)",
                 suffix=".mlp", channel_dim=-1, shortcut=between, branch="mlp"),
    ]


VISION_RULES = (
    ("torchvision resnet", torchvision_resnet),
    ("timm resnet", timm_resnet),
    ("timm resnetv2", timm_resnetv2),
    ("timm normfree", timm_normfree),
    ("timm convnext", timm_convnext),
    ("timm vit", timm_vit),
    ("timm swin", timm_swin),
)

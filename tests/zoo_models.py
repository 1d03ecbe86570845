"""A zoo of tiny, randomly initialised third-party architectures: the real classes of timm, torchvision and
transformers, shrunk (depths of 1-2 per stage, widths 16-64, inputs 32-64 px) so each builds in well under a
second and runs a forward in a few tens of milliseconds on one core. spp was written without seeing most of
them, which is the point: they are where discovery meets code nobody here wrote.

``ZOO`` is a list of ``ZooModel(id, build)``; ``build()`` returns ``(model, example_input)`` with the model in
eval mode. Builders seed torch's global generator so every call builds the same weights. Where a timm factory
fixes the argument we need to shrink (``_create_x(**dict(fixed, **kwargs))`` would collide), the builder calls
the architecture class (or its config dataclass) directly, with the variant's own settings and smaller sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Built = tuple[nn.Module, torch.Tensor]


@dataclass(frozen=True)
class ZooModel:
    id: str
    build: Callable[[], Built]
    note: str = ""  # what makes the model interesting for discovery


def _image(size: int, batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _ready(model: nn.Module, size: int) -> Built:
    return model.eval(), _image(size)


def _timm(name: str, size: int, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        import timm

        torch.manual_seed(0)
        return _ready(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), size)

    return build


def _class(path: str, size: int, **kwargs) -> Callable[[], Built]:
    """``path`` = "package.module:Class" (or a factory function)."""

    def build() -> Built:
        import importlib

        module, attr = path.split(":")
        torch.manual_seed(0)
        return _ready(getattr(importlib.import_module(module), attr)(**kwargs), size)

    return build


# ---- timm: configs that need their dataclass shrunk --------------------------------------------------------


def _timm_nfnet(variant: str, size: int, **cfg) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import nfnet

        torch.manual_seed(0)
        model_cfg = dataclasses.replace(nfnet.model_cfgs[variant], **cfg)
        return _ready(nfnet.NormFreeNet(model_cfg, num_classes=10), size)

    return build


def _timm_regnet(variant: str, size: int, **cfg) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import regnet

        torch.manual_seed(0)
        return _ready(regnet.RegNet(dataclasses.replace(regnet.model_cfgs[variant], **cfg), num_classes=10), size)

    return build


def _timm_maxxvit(variant: str, size: int, **cfg) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import maxxvit

        torch.manual_seed(0)
        base = maxxvit.model_cfgs[variant]
        transformer = dataclasses.replace(base.transformer_cfg, **cfg.pop("transformer", {}))
        model_cfg = dataclasses.replace(base, transformer_cfg=transformer, **cfg)
        return _ready(maxxvit.MaxxVit(model_cfg, img_size=size, num_classes=10), size)

    return build


def _timm_hrnet(size: int) -> Built:
    import copy

    from timm.models import hrnet

    torch.manual_seed(0)
    cfg = copy.deepcopy(hrnet.cfg_cls["hrnet_w18_small"])
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        cfg[stage]["num_blocks"] = tuple(1 for _ in cfg[stage]["num_blocks"])
        cfg[stage]["num_channels"] = tuple(max(8, c // 2) for c in cfg[stage]["num_channels"])
        cfg[stage]["num_modules"] = 1
    return _ready(hrnet.HighResolutionNet(cfg, num_classes=10), size)


def _timm_efficientnet(variant: str, size: int, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import efficientnet

        torch.manual_seed(0)
        return _ready(efficientnet._gen_efficientnet(variant, num_classes=10, **kwargs), size)

    return build


def _timm_mobilenet(gen: str, variant: str, multiplier: float, size: int) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import mobilenetv3

        torch.manual_seed(0)
        return _ready(getattr(mobilenetv3, gen)(variant, multiplier, num_classes=10), size)

    return build


def _metaformer(size: int, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import metaformer

        torch.manual_seed(0)
        mixers = kwargs.pop("token_mixers", None)
        norms = kwargs.pop("norm_layers", None)
        resolved = {}
        if mixers is not None:
            resolved["token_mixers"] = [getattr(metaformer, m) if isinstance(m, str) else m for m in mixers]
        if norms is not None:
            resolved["norm_layers"] = [getattr(metaformer, n) for n in norms]
        return _ready(metaformer.MetaFormer(num_classes=10, **kwargs, **resolved), size)

    return build


def _mixer(size: int, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        from timm.models import mlp_mixer

        torch.manual_seed(0)
        for key in ("block_layer", "norm_layer"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = getattr(mlp_mixer, kwargs[key])
        return _ready(mlp_mixer.MlpMixer(img_size=size, num_classes=10, **kwargs), size)

    return build


# ---- torchvision -------------------------------------------------------------------------------------------


def _tv_resnet(block: str, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        from torchvision.models import resnet

        torch.manual_seed(0)
        return _ready(resnet.ResNet(getattr(resnet, block), [1, 1, 1, 1], num_classes=10, **kwargs), 32)

    return build


def _tv_regnet() -> Built:
    from torchvision.models import regnet

    torch.manual_seed(0)
    params = regnet.BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return _ready(regnet.RegNet(params, num_classes=10, stem_width=16), 32)


def _tv_efficientnet() -> Built:
    from torchvision.models import efficientnet

    torch.manual_seed(0)
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return _ready(efficientnet.EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=10), 32)


def _tv_mobilenet_v3() -> Built:
    from torchvision.models import mobilenetv3

    torch.manual_seed(0)
    setting, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_large", width_mult=0.25)
    return _ready(mobilenetv3.MobileNetV3(setting, last, num_classes=10), 32)


def _tv_convnext() -> Built:
    from torchvision.models import convnext

    torch.manual_seed(0)
    c = convnext.CNBlockConfig
    setting = [c(16, 32, 1), c(32, 64, 1), c(64, None, 1)]
    return _ready(convnext.ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10), 32)


def _tv_vit() -> Built:
    from torchvision.models import vision_transformer

    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return _ready(model, 32)


def _tv_swin(version: str) -> Callable[[], Built]:
    def build() -> Built:
        from torchvision.models import swin_transformer as sw

        torch.manual_seed(0)
        kw = {}
        if version == "v2":
            kw = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2}
        model = sw.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
            stochastic_depth_prob=0.1, num_classes=10, **kw,
        )
        return _ready(model, 32)

    return build


def _tv_maxvit() -> Built:
    from torchvision.models import maxvit

    torch.manual_seed(0)
    model = maxvit.MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.1, num_classes=10,
    )
    return _ready(model, 32)


def _tv_densenet() -> Built:
    from torchvision.models import densenet

    torch.manual_seed(0)
    return _ready(densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, num_classes=10), 32)


# ---- transformers ------------------------------------------------------------------------------------------


def _hf(model_type: str, **overrides) -> Callable[[], Built]:
    def build() -> Built:
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        cfg = AutoConfig.for_model(model_type, **overrides)
        model = AutoModel.from_config(cfg)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        return model.eval(), ids

    return build


_HF_SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64,
             "vocab_size": 128}

ZOO: list[ZooModel] = [
    # ---- timm CNNs
    ZooModel("timm/resnet18", _timm("resnet18", 32, layers=(1, 1, 1, 1)), "BasicBlock, post-activation"),
    ZooModel("timm/resnet50", _timm("resnet50", 32, layers=(1, 1, 1, 1)), "Bottleneck, post-activation"),
    ZooModel("timm/seresnext26d", _timm("seresnext26d_32x4d", 32, layers=(1, 1, 1, 1)), "SE before the add"),
    ZooModel("timm/resnetv2_50x1_bit", _class("timm.models.resnetv2:_create_resnetv2_bit", 32,
                                              variant="resnetv2_50x1_bit", layers=[1, 1, 1, 1], width_factor=1,
                                              num_classes=10), "pre-activation, StdConv"),
    ZooModel("timm/resnetv2_50", _timm("resnetv2_50", 32, layers=(1, 1, 1, 1)), "ResNetV2 v1.5 Bottleneck"),
    ZooModel("timm/nf_resnet50", _timm_nfnet("nf_resnet50", 32, depths=(1, 1, 1, 1)), "NF, alpha, skipinit"),
    ZooModel("timm/nf_regnet_b0", _timm_nfnet("nf_regnet_b0", 32, depths=(1, 1, 1, 1)), "NF RegNet, SE"),
    ZooModel("timm/dm_nfnet_f0", _timm_nfnet("dm_nfnet_f0", 32, depths=(1, 1, 1, 1),
                                             channels=(32, 64, 96, 128), group_size=8, stem_chs=16,
                                             num_features=128), "NFNet, attn_gain, skipinit"),
    ZooModel("timm/convnext", _class("timm.models.convnext:ConvNeXt", 32, depths=(1, 1, 1, 1),
                                     dims=(16, 32, 48, 64), num_classes=10), "channels-last mlp, gamma"),
    ZooModel("timm/convnext_conv_mlp", _class("timm.models.convnext:ConvNeXt", 32, depths=(1, 1, 1, 1),
                                              dims=(16, 32, 48, 64), conv_mlp=True, num_classes=10), "NCHW mlp"),
    ZooModel("timm/regnety_002", _timm_regnet("regnety_002", 32, depth=7), "SE, projection shortcut"),
    ZooModel("timm/regnetx_002", _timm_regnet("regnetx_002", 32, depth=7), "no SE"),
    ZooModel("timm/efficientnet_b0", _timm_efficientnet("efficientnet_b0", 32, channel_multiplier=0.25,
                                                        depth_multiplier=0.25), "inverted residual"),
    ZooModel("timm/mobilenetv3_large", _timm_mobilenet("_gen_mobilenet_v3", "mobilenetv3_large_100", 0.35, 32),
             "inverted residual, hard-swish"),
    ZooModel("timm/mobilenetv4_conv_small", _timm_mobilenet("_gen_mobilenet_v4", "mobilenetv4_conv_small", 0.5, 32),
             "universal inverted residual, layer scale"),
    ZooModel("timm/mobilenetv4_hybrid_medium",
             _timm_mobilenet("_gen_mobilenet_v4", "mobilenetv4_hybrid_medium", 0.25, 64), "MQA attention blocks"),
    ZooModel("timm/dla34", _timm("dla34", 32, levels=(1, 1, 1, 1, 1, 1)), "tree aggregation (roots add)"),
    ZooModel("timm/hrnet_w18_small", lambda: _timm_hrnet(64), "multi-resolution fusion sums"),
    ZooModel("timm/ghostnet", _class("timm.models.ghostnet:_create_ghostnet", 32, variant="ghostnet_100",
                                     width=0.25, num_classes=10), "ghost bottleneck"),
    ZooModel("timm/rexnet", _timm("rexnet_100", 32, width_mult=0.25), "partial-channel residual"),
    ZooModel("timm/repvit", _timm("repvit_m0_9", 64, embed_dim=(16, 32, 48, 64), depth=(1, 1, 1, 1)),
             "Residual wrapper module"),
    ZooModel("timm/inception_next", _class("timm.models.inception_next:MetaNeXt", 32, depths=(1, 1, 1, 1),
                                           dims=(16, 32, 48, 64), num_classes=10), "ConvNeXt-like, gamma"),
    ZooModel("timm/vgg11", _class("timm.models.vgg:VGG", 32, cfg=[16, "M", 32, "M", 32, "M", 32, "M", 32, "M"],
                                  num_classes=10), "no residual: must be refused"),
    ZooModel("timm/densenet121", _class("timm.models.densenet:DenseNet", 32, growth_rate=8,
                                        block_config=(2, 2, 2, 2), num_classes=10), "concatenation, no residual"),
    # ---- timm MLPs, metaformers
    ZooModel("timm/mixer", _mixer(32, patch_size=8, num_blocks=2, embed_dim=32), "token MLP on transposed tokens"),
    ZooModel("timm/resmlp_12_224", _mixer(32, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=4,
                                          block_layer="ResBlock", norm_layer="Affine"), "Affine + layer scale"),
    ZooModel("timm/poolformer_s12", _metaformer(32, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                                                norm_layers=["GroupNorm1"] * 4, layer_scale_init_values=1e-5,
                                                res_scale_init_values=None, use_mlp_head=False),
             "pooling mixer x - pool(x)"),
    ZooModel("timm/poolformerv2_s12", _metaformer(32, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                  norm_layers=["GroupNorm1NoBias"] * 4, use_mlp_head=False),
             "res_scale on the shortcut"),
    ZooModel("timm/caformer_s18", _metaformer(64, depths=(1, 1, 1, 1), dims=(16, 32, 64, 64),
                                              token_mixers=["SepConv", "SepConv", "Attention", "Attention"],
                                              norm_layers=["LayerNorm2dNoBias"] * 2 + ["LayerNormNoBias"] * 2),
             "LayerNorm2dNoBias subclasses LayerNorm; res_scale"),
    ZooModel("timm/convformer_s18", _metaformer(32, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                token_mixers=["SepConv"] * 4, norm_layers=["LayerNorm2dNoBias"] * 4),
             "NCHW stream with permuting norms"),
    ZooModel("timm/edgenext_xx_small", _timm("edgenext_xx_small", 64, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                             heads=(2, 2, 2, 2)), "gamma before permute; SplitTransposeBlock"),
    ZooModel("timm/fastvit_t8", _timm("fastvit_t8", 64, layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64)),
             "RepMixer nested residual inside token_mixer"),
    ZooModel("timm/fastvit_sa12", _timm("fastvit_sa12", 64, layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64)),
             "attention stage, conditional pos. encoding"),
    ZooModel("timm/efficientvit_b0", _timm("efficientvit_b0", 64, widths=(8, 16, 16, 32, 32), depths=(1, 1, 1, 1, 1),
                                           head_widths=(64, 64)), "MIT: lite MSA, ResidualBlock wrapper"),
    ZooModel("timm/efficientvit_m0", _timm("efficientvit_m0", 64, img_size=64, embed_dim=(16, 32, 48),
                                           depth=(1, 1, 1), num_heads=(2, 2, 2), window_size=(4, 4, 4)),
             "MSRA: cascaded group attention, Residual wrapper"),
    # ---- timm transformers
    ZooModel("timm/vit_tiny", _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, embed_dim=32, depth=2,
                                    num_heads=2), "pre-norm Block, pos embed add"),
    ZooModel("timm/deit3_small", _timm("deit3_small_patch16_224", 32, img_size=32, patch_size=8, embed_dim=32,
                                       depth=2, num_heads=2), "layer scale, no_embed_class"),
    ZooModel("timm/beit", _timm("beit_base_patch16_224", 32, img_size=32, patch_size=8, embed_dim=32, depth=2,
                                num_heads=2), "gamma_1 parameters inline, rel pos bias"),
    ZooModel("timm/cait_xxs24_224", _timm("cait_xxs24_224", 32, img_size=32, patch_size=8, embed_dim=32, depth=2,
                                          num_heads=2), "class attention adds into x_cls (2nd argument)"),
    ZooModel("timm/swin_tiny", _timm("swin_tiny_patch4_window7_224", 32, img_size=32, embed_dim=16, depths=(1, 1),
                                     num_heads=(1, 2), window_size=4), "NHWC windows"),
    ZooModel("timm/swinv2_cr_tiny_ns_224", _timm("swinv2_cr_tiny_ns_224", 32, img_size=32, embed_dim=16,
                                                 depths=(1, 1), num_heads=(1, 2), window_size=4),
             "post-norm, shape-derived reshapes"),
    ZooModel("timm/levit_128s", _class("timm.models.levit:Levit", 64, img_size=64, embed_dim=(32, 48, 64),
                                       key_dim=8, depth=(1, 1, 1), num_heads=(2, 2, 2), num_classes=10),
             "Residual wrapper, BN on flattened tokens"),
    ZooModel("timm/maxvit_nano_rw", _timm_maxxvit("maxvit_nano_rw", 64, depths=(1, 1, 1, 1),
                                                  embed_dim=(16, 32, 48, 64), stem_width=(8, 16),
                                                  transformer={"dim_head": 8, "window_size": (2, 2),
                                                               "grid_size": (2, 2)}),
             "MBConv + block/grid attention"),
    ZooModel("timm/coatnet_nano_rw", _timm_maxxvit("coatnet_nano_rw", 64, depths=(1, 1, 1, 1),
                                                   embed_dim=(16, 32, 48, 64), stem_width=(8, 16),
                                                   transformer={"dim_head": 8}), "MBConv then transformer stages"),
    ZooModel("timm/eva02_tiny", _timm("eva02_tiny_patch14_224", 28, img_size=28, patch_size=7, embed_dim=32, depth=2,
                                      num_heads=2), "rope, SwiGLU"),
    ZooModel("timm/xcit_nano", _timm("xcit_nano_12_p16_224", 32, img_size=32, patch_size=16, embed_dim=32, depth=2,
                                     num_heads=2, cls_attn_layers=1), "XCA + LPI (conv on token grid)"),
    ZooModel("timm/pvt_v2_b0", _timm("pvt_v2_b0", 64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 2, 2)), "spatial reduction attention, dwconv in mlp"),
    ZooModel("timm/mobilevit_xxs", _timm("mobilevit_xxs", 64), "unfold/fold patch transformer in a conv net"),
    ZooModel("timm/davit_tiny", _timm("davit_tiny", 64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 2, 4), window_size=2), "channel attention, ConvPosEnc"),
    # ---- torchvision
    ZooModel("tv/resnet18", _tv_resnet("BasicBlock"), "BasicBlock"),
    ZooModel("tv/resnet50", _tv_resnet("Bottleneck"), "Bottleneck"),
    ZooModel("tv/resnext50_32x4d", _tv_resnet("Bottleneck", groups=32, width_per_group=4), "grouped"),
    ZooModel("tv/wide_resnet50_2", _tv_resnet("Bottleneck", width_per_group=128), "wide"),
    ZooModel("tv/regnet_y", _tv_regnet, "ResBottleneckBlock: proj(x) + f(x)"),
    ZooModel("tv/efficientnet_b0", _tv_efficientnet, "MBConv, StochasticDepth"),
    ZooModel("tv/mobilenet_v3_large", _tv_mobilenet_v3, "InvertedResidual"),
    ZooModel("tv/convnext", _tv_convnext, "CNBlock: layer_scale * block(x)"),
    ZooModel("tv/vit", _tv_vit, "EncoderBlock with nn.MultiheadAttention"),
    ZooModel("tv/swin_t", _tv_swin("v1"), "NHWC stream"),
    ZooModel("tv/swin_v2_t", _tv_swin("v2"), "post-norm inside the branch"),
    ZooModel("tv/maxvit_t", _tv_maxvit, "partitioned (B, G, P, C) residuals"),
    ZooModel("tv/densenet", _tv_densenet, "no residual: must be refused"),
    # ---- transformers
    ZooModel("hf/bert", _hf("bert", **_HF_SMALL), "post-norm: LayerNorm(hidden + input_tensor), 2nd argument"),
    ZooModel("hf/gpt2", _hf("gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=32), "pre-norm"),
    ZooModel("hf/llama", _hf("llama", num_key_value_heads=2, **_HF_SMALL), "RMSNorm, rope"),
]


def zoo_ids() -> list[str]:
    return [m.id for m in ZOO]


def get(model_id: str) -> ZooModel:
    return next(m for m in ZOO if m.id == model_id)

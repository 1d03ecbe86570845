"""HF vision models: whatever TRANSFORMER_RULES claims must still be exact (stream == shortcut + scale * branch)."""
import sys, torch, warnings, re
sys.path.insert(0, "scratch")
warnings.simplefilter("ignore"); torch.set_num_threads(1)
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hl
hl.set_verbosity_error()
from verify_all import claim, capture
from spp.taps import Site
from spp.errors import SppError
V = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
SPECS = {"vit": V, "deit": V, "beit": {**V, "layer_scale_init_value": 0.1}, "dinov2": V, "data2vec-vision": V,
         "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4),
         "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), "clip_vision_model": V, "siglip_vision_model": V,
         "vit_mae": {**V, "mask_ratio": 0.0}, "ijepa": V, "levit": {}, "segformer": dict(depths=[1, 1, 1, 1]),
         "mobilevit": {}, "dinov2_with_registers": V, "pvt_v2": {}}
for mt, over in SPECS.items():
    try:
        cfg = AutoConfig.for_model(mt, **over); torch.manual_seed(0); model = AutoModel.from_config(cfg).eval()
        taps, claimed = claim(model)
    except SppError as e:
        print(f"{mt:24s} REFUSED {e}"); continue
    except Exception as e:
        print(f"{mt:24s} ERROR {type(e).__name__} {str(e)[:120]}"); continue
    if not taps:
        print(f"{mt:24s} unclaimed"); continue
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sites = {s for t in taps for s in (t.output, t.shortcut, t.residual if isinstance(t.residual, Site) else t.output)}
    store = capture(model, sites, {"pixel_values": x})
    counts = {len(v) for v in store.values()}
    worst = 0.0
    for t in taps:
        if not isinstance(t.residual, Site): continue
        o, s, r = (store[z][0] for z in (t.output, t.shortcut, t.residual))
        m = re.search(r"multiplied by .* = ([-0-9.e]+)", t.note)
        scale = float(m.group(1)) if m else 1.0
        p = re.search(r"multiplied by self\.(\w+) before", t.note)
        if p:
            scale = getattr(model.get_submodule(t.module), p.group(1)).detach().double()
        if "layer scale" in t.note:
            ls = [mod for n, mod in model.get_submodule(t.module).named_children() if "layer_scale" in n]
            idx = 0 if t.branch == "attn" else 1
            scale = ls[idx].lambda1.detach().double()
        C = o.shape[-1]
        err = ((o.reshape(-1, C).double() - s.reshape(-1, C).double() - scale * r.reshape(-1, C).double()).abs().max() / o.abs().max()).item()
        worst = max(worst, err)
    print(f"{mt:24s} taps={len(taps)} fires={counts} worst={worst:.1e} | {taps[0].rule} | {taps[0].note[:100]}")

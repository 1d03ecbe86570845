"""For many transformers model types: build tiny, claim with TRANSFORMER_RULES, check every tap on real tensors
captured with independent hooks: each site fires once; output == shortcut + scale * branch."""
import sys, inspect, re, time, torch, warnings, traceback
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hl
hl.set_verbosity_error()
from spp.rules.transformers import TRANSFORMER_RULES
from spp.taps import Site, Difference
from spp.errors import SppError

def claim(model):
    taps, claimed = [], []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed): continue
        for label, rule in TRANSFORMER_RULES:
            found = rule(name, mod)
            if found:
                taps.extend(found); claimed.append(name); break
    return taps, claimed

def first_tensor(v):
    if isinstance(v, torch.Tensor): return v
    if isinstance(v, (tuple, list)):
        for x in v:
            if isinstance(x, torch.Tensor): return x
    if isinstance(v, dict):
        for x in v.values():
            if isinstance(x, torch.Tensor): return x
    return None

def capture(model, sites, inputs):
    store, handles = {s: [] for s in sites}, []
    for site in sites:
        mod = model.get_submodule(site.module)
        if site.kind == "output":
            def hook(m, a, out, site=site): store[site].append(first_tensor(out).detach().clone())
            handles.append(mod.register_forward_hook(hook))
        else:
            names = list(inspect.signature(mod.forward).parameters)
            def pre(m, args, kwargs, site=site, names=names):
                arg = site.arg
                if isinstance(arg, int) and arg < len(args): x = args[arg]
                else:
                    key = arg if isinstance(arg, str) else names[arg]
                    x = kwargs[key]
                store[site].append(x.detach().clone())
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles: h.remove()
    return store

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)

def build(mt, extra):
    kw = dict(SMALL); kw.update(extra)
    cfg = AutoConfig.for_model(mt, **kw)
    for k in ("num_key_value_heads",):
        if hasattr(cfg, k) and getattr(cfg, k) and getattr(cfg, k) > 4: setattr(cfg, k, 4)
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval(), cfg

def inputs_for(model, cfg, L=8, B=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(cfg.vocab_size, 100), (B, L), generator=g)
    inp = {"input_ids": ids}
    params = inspect.signature(model.forward).parameters
    if "decoder_input_ids" in params: inp["decoder_input_ids"] = ids.clone()
    if "use_cache" in params: inp["use_cache"] = False
    return inp

def check(mt, extra=None, scale=None, verbose=False):
    extra = extra or {}
    model, cfg = build(mt, extra)
    try:
        taps, claimed = claim(model)
    except SppError as e:
        return f"REFUSED: {e}"
    if not taps:
        return "unclaimed"
    sites = set()
    for t in taps:
        sites.add(t.output); sites.add(t.shortcut)
        if isinstance(t.residual, Site): sites.add(t.residual)
    store = capture(model, sites, inputs_for(model, cfg))
    worst, bad = 0.0, []
    for s, vals in store.items():
        if len(vals) != 1: bad.append(f"{s} fired {len(vals)}x")
    if bad: return "SITE COUNT: " + "; ".join(bad[:3])
    m = getattr(cfg, "residual_multiplier", 1.0)
    for t in taps:
        o, s = store[t.output][0], store[t.shortcut][0]
        C = o.shape[-1]
        o, s = o.reshape(-1, C).double(), s.reshape(-1, C).double()
        if isinstance(t.residual, Site):
            r = store[t.residual][0].reshape(-1, C).double()
            err = (o - (s + m * r)).abs().max().item() / (o.abs().max().item() + 1e-12)
            worst = max(worst, err)
    kinds = sorted({t.branch for t in taps})
    layers = len(claimed)
    rules = sorted({re.sub(r"transformers \w+: ", "", t.rule) for t in taps})
    status = "OK" if worst < 1e-5 else f"MISMATCH {worst:.2e}"
    return f"{status} taps={len(taps)} layers={layers} branches={kinds} rel_err={worst:.1e} | " + " / ".join(rules[:4]) + (f" | stream: {taps[0].stream}" if taps[0].stream else "") + (f" | note: {taps[0].note}" if taps[0].note else "")

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        mt, extra = spec, {}
        if ":" in spec:
            mt, rest = spec.split(":", 1)
            for kv in rest.split(";"):
                k, v = kv.split("=", 1); extra[k] = eval(v)
        t0 = time.time()
        try:
            res = check(mt, extra, scale=extra.pop("_scale", None) if "_scale" in extra else None)
        except Exception as e:
            res = f"ERROR {type(e).__name__}: {str(e)[:200]}"
        print(f"{spec:45s} {res}  [{time.time()-t0:.1f}s]", flush=True)

import sys, torch, warnings, inspect
sys.path.insert(0, "scratch")
warnings.simplefilter("ignore"); torch.set_num_threads(1)
from verify_all import build, claim, inputs_for
SPECS = [("gpt2", {}), ("llama", {}), ("mistral", {"num_key_value_heads": 2}), ("qwen2", {"num_key_value_heads": 2}),
 ("qwen3", {"num_key_value_heads": 2}), ("gemma", {"num_key_value_heads": 2, "head_dim": 16}), ("gemma2", {"num_key_value_heads": 2, "head_dim": 16}),
 ("gemma3_text", {"num_key_value_heads": 2, "head_dim": 16}), ("bert", {}), ("roberta", {}), ("distilbert", {}), ("t5", {}),
 ("gpt_neox", {}), ("phi", {}), ("falcon", {}), ("opt", {}), ("bloom", {}), ("mixtral", {"num_key_value_heads": 2}), ("qwen2_moe", {"num_key_value_heads": 2})]
for mt, extra in SPECS:
    model, cfg = build(mt, extra)
    taps, claimed = claim(model)
    layer_name = claimed[0] if claimed else None
    layer = model.get_submodule(layer_name)
    kinds = {}
    hs = []
    def hook(m, a, out, name=""):
        kinds[name] = type(out).__name__ + (f"[{len(out)}]" if isinstance(out, (tuple, list)) else "")
    for n, c in layer.named_children():
        hs.append(c.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)))
    hs.append(layer.register_forward_hook(lambda m, a, o: hook(m, a, o, "<layer>")))
    with torch.no_grad(): model(**inputs_for(model, cfg))
    for h in hs: h.remove()
    print(f"{mt}: {type(model).__name__}, {layer_name} {type(layer).__name__} -> {kinds.get('<layer>')}; children: " + ", ".join(f"{n}:{type(c).__name__}->{kinds.get(n,'-')}" for n, c in layer.named_children()))

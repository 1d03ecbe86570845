import time, torch, warnings
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModel
import sys
sys.path.insert(0, "scratch")
from verify_all import claim
for mt in ["llama", "bert", "t5"]:
    cfg = AutoConfig.for_model(mt, num_hidden_layers=32, num_layers=32, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=128)
    m = AutoModel.from_config(cfg)
    t = time.perf_counter(); taps, _ = claim(m); dt = time.perf_counter() - t
    t = time.perf_counter(); taps, _ = claim(m); dt2 = time.perf_counter() - t
    print(mt, len(taps), f"first {dt*1000:.0f} ms, again {dt2*1000:.0f} ms")

"""Runs from plain settings: the forward's precision and device, the user's model kept as it is.
"""

from __future__ import annotations

import pytest
import torch

from spp.loading import LoadedModel
from spp.models import create_model
from spp.run import RunConfig, record_run

CUDA = torch.cuda.is_available()

MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




def test_bfloat16_forward_on_cpu_keeps_float32_statistics():
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4)
    full = record_run(cfg)
    low = record_run(RunConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
    assert [r["count"] for r in low.rows] == [r["count"] for r in full.rows]
    for a, b in zip(full.rows[1:], low.rows[1:], strict=True):
        assert b["avg_var"] == pytest.approx(a["avg_var"], rel=0.1)  # bf16 rounding, not a different model
    assert any(a["avg_var"] != b["avg_var"] for a, b in zip(full.rows, low.rows, strict=True))  # autocast ran
    assert low.settings["run"]["dtype"] == "bfloat16"


def test_users_model_keeps_its_dtype_and_weights():
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RunConfig(model="mine", resolution=32, batch_size=2, dtype="bfloat16")
    record_run(cfg, loaded=LoadedModel(model, "mine", "file", "mine"))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@needs_cuda
def test_cuda_record_equals_cpu_record():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4,
                    num_samples=8)
    cpu = record_run(cfg)
    gpu = record_run(RunConfig(**{**cfg.__dict__, "device": "cuda"}))
    for a, b in zip(cpu.rows[1:], gpu.rows[1:], strict=True):
        assert b["avg_var"] == pytest.approx(a["avg_var"], rel=1e-4)
        assert b["res_avg_var"] == pytest.approx(a["res_avg_var"], rel=1e-4)
    half = record_run(RunConfig(**{**cfg.__dict__, "device": "cuda", "dtype": "bfloat16"}))
    assert all(r["nonfinite"] == 0 for r in half.rows)


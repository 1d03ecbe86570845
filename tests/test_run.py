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



# ---- micro-batches: what a recording normalises over, said truthfully ------------------------------------------
BN_TINY = {"model": "bn_relu_resnet50", "model_kwargs": {"width": 0.0625}, "resolution": 32}


def test_a_remainder_bn_cannot_normalise_is_dropped_and_said():
    """--batch-size 8 --num-samples 9 failed with "batch size 1 ... use --batch-size 2" although the user gave 8.
    Now the last sample is dropped with one warning, and the record is exactly the 8-sample one (Gaussian
    micro-batch j is drawn from (seed, j), so micro-batch 0 is the same samples)."""
    with pytest.warns(UserWarning, match=r"^used 8 of 9 samples: BatchNorm in train mode .* the last 1 would"):
        rec = record_run(RunConfig(**BN_TINY, batch_size=8, num_samples=9))
    exact = record_run(RunConfig(**BN_TINY, batch_size=8, num_samples=8))
    assert rec.column("avg_var") == exact.column("avg_var")
    s = rec.settings
    assert (s["samples"], s["num_samples"], s["micro_batch_sizes"], s["samples_dropped"]) == (8, 8, [8], 1)


def test_a_short_last_micro_batch_is_not_normalised_silently():
    """--num-samples 10 --batch-size 4 used to normalise a last micro-batch of 2 without a word."""
    with pytest.warns(UserWarning, match="used 8 of 10 samples"):
        rec = record_run(RunConfig(**BN_TINY, batch_size=4, num_samples=10))
    assert rec.settings["micro_batch_sizes"] == [4] and rec.settings["batches"] == 2


def test_without_batch_statistics_every_sample_counts():
    """No BatchNorm (NF-ResNet), or BN in eval mode: micro-batches merge exactly whatever their sizes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf = record_run(RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625}, resolution=32, batch_size=4,
                                  num_samples=10))
        ev = record_run(RunConfig(**BN_TINY, batch_size=4, num_samples=9, mode="eval"))
    assert (nf.settings["samples"], nf.settings["micro_batch_sizes"], nf.settings["samples_dropped"]) == (10, [4, 2], 0)
    assert ev.settings["samples"] == 9 and ev.settings["micro_batch_sizes"] == [4, 1]


def test_fewer_samples_than_the_batch_size_are_one_normalisation_batch():
    with pytest.warns(UserWarning, match="5 samples, fewer than --batch-size 8: .* one micro-batch of 5"):
        rec = record_run(RunConfig(**BN_TINY, batch_size=8, num_samples=5))
    assert rec.settings["micro_batch_sizes"] == [5] and rec.settings["samples"] == 5
    from spp.errors import SppError

    with pytest.raises(SppError, match="1 sample with BatchNorm in train mode"):
        record_run(RunConfig(**BN_TINY, batch_size=8, num_samples=1))


def test_a_failing_forward_names_the_input_shape_it_got(tmp_path):
    """A (N, L) tensor fed to an image model: the error shows (batch, 10), not an image shape it never got."""
    from spp.errors import SppError

    path = tmp_path / "flat.pt"
    torch.save(torch.randn(4, 10), str(path))
    with pytest.raises(SppError, match=r"failed on input of shape \(batch, 10\)"):
        record_run(RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625}, input=str(path), batch_size=2))


@pytest.mark.parametrize(("model", "kwargs", "extra"), [
    ("nf_resnet50", {"width": 0.0625}, {"resolution": 32}),
    ("nf_transformer6", {"width": 32}, {"input": "embeddings", "seq_len": 8}),
])
def test_a_theory_line_is_only_kept_for_the_unit_inputs_it_assumes(model, kwargs, extra):
    """NF beta bookkeeping and the transformer derivations expect unit-variance inputs (stem variance 1): at
    --input-std 1 the column holds them; at 2 the stem's variance is no longer the theory's, so expected_var is
    NaN at every row and a warning says why, never a line drawn for another input."""
    import math

    base = RunConfig(model=model, model_kwargs=kwargs, batch_size=4, **extra)
    unit = record_run(base)
    assert unit.rows[0]["expected_var"] == 1.0 and all(math.isfinite(r["expected_var"]) for r in unit.rows)
    with pytest.warns(UserWarning, match="theory assumes unit-variance inputs"):
        scaled = record_run(RunConfig(**{**base.__dict__, "input_std": 2.0}))
    assert all(math.isnan(r["expected_var"]) for r in scaled.rows)
    assert scaled.rows[0]["avg_var"] > 2 * unit.rows[0]["avg_var"]  # the stem saw the larger input

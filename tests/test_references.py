"""Which references a record gets, and on which inputs: exactly the run that made the record."""

from __future__ import annotations

import pytest

from spp.errors import SppError
from spp.records import Record
from spp.references import is_same_run, reference_config, reference_names, run_of
from spp.run import RunConfig


def test_names_follow_the_nearest_depth():
    assert reference_names(None, 16) == ["bn_relu_resnet50", "relu_bn_resnet50", "nf_resnet50"]
    assert reference_names("auto", 190) == ["bn_relu_resnet600", "relu_bn_resnet600", "nf_resnet600"]
    assert reference_names("nf_resnet,bn_relu_resnet101", 40) == ["nf_resnet101", "bn_relu_resnet101"]
    assert reference_names("none", 16) == []
    with pytest.raises(SppError, match="unknown reference 'vgg16'"):
        reference_names("vgg16", 16)


def test_reference_config_keeps_the_inputs_and_takes_train_mode():
    cfg = RunConfig(model="nf_resnet50?width=0.25", input="imgs/", num_samples=12, batch_size=4, resolution=64,
                    seed=3, mode="eval")
    ref = reference_config(cfg, "bn_relu_resnet50")
    assert (ref.input, ref.num_samples, ref.batch_size, ref.resolution, ref.seed) == ("imgs/", 12, 4, 64, 3)
    assert ref.model_kwargs == {"width": 0.25} and ref.mode == "train"
    assert is_same_run(RunConfig(model="nf_resnet50"), reference_config(RunConfig(model="nf_resnet50"),
                                                                        "nf_resnet50"))


def test_run_of_a_record_is_its_exact_run_config():
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.25}, input="x.npy", num_samples=5,
                    batch_size=2, seed=9, blocks=("stages.*",), mode="eval", dtype="bfloat16")
    assert run_of(Record(rows=[], stage_ends=[], settings={"run": cfg.describe()})) == cfg


def test_run_of_a_library_record_reads_its_input_settings():
    rec = Record(rows=[], stage_ends=[], settings={"model": "m", "input": "gaussian", "input_shape": [1, 48, 48],
                                                   "num_samples": 6, "batch_size": 3, "seed": 2, "input_std": 0.5})
    cfg = run_of(rec)
    assert (cfg.resolution, cfg.in_chans, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.input_std) == \
        (48, 1, 6, 3, 2, 0.5)

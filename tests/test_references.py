"""Which references a record gets, and on which inputs: exactly the run that made the record, of the right kind."""

from __future__ import annotations

import pytest
import torch

import spp.hooks
from spp import references
from spp.errors import SppError
from spp.models import create_model
from spp.records import Record
from spp.references import (
    is_same_run,
    reference_config,
    reference_names,
    reference_plan,
    references_for,
    resolved_run,
    run_of,
)
from spp.run import RunConfig, record_run


def test_names_follow_the_nearest_depth():
    assert reference_names(None, 16) == ["bn_relu_resnet50", "relu_bn_resnet50", "nf_resnet50"]
    assert reference_names("auto", 190) == ["bn_relu_resnet600", "relu_bn_resnet600", "nf_resnet600"]
    assert reference_names("nf_resnet,bn_relu_resnet101", 40) == ["nf_resnet101", "bn_relu_resnet101"]
    assert reference_names("none", 16) == []
    assert reference_names(None, 11, "transformer") == ["preln_transformer12", "postln_transformer12",
                                                       "nf_transformer12"]
    with pytest.raises(SppError, match="unknown reference 'vgg16'"):
        reference_names("vgg16", 16)


def test_reference_config_keeps_the_inputs_and_takes_train_mode_for_batchnorm():
    cfg = RunConfig(model="nf_resnet50?width=0.25", input="imgs/", num_samples=12, batch_size=4, resolution=64,
                    seed=3, mode="eval")
    ref = reference_config(cfg, "bn_relu_resnet50")
    assert (ref.input, ref.num_samples, ref.batch_size, ref.resolution, ref.seed) == ("imgs/", 12, 4, 64, 3)
    assert ref.model_kwargs == {"width": 0.25} and ref.mode == "train"  # eval-mode BN at init is an identity
    assert reference_config(cfg, "nf_resnet50").mode == "eval"  # no BatchNorm: the model's own mode
    assert references.has_batchnorm("bn_relu_resnet50") and not references.has_batchnorm("bn_relu_resnet50",
                                                                                            {"norm": "gn"})
    assert is_same_run(resolved_run(_record_of(RunConfig(model="nf_resnet50"))),
                       reference_config(_record_of(RunConfig(model="nf_resnet50")), "nf_resnet50"))


def _record_of(cfg: RunConfig, **settings) -> Record:
    return Record(rows=[], stage_ends=[], settings={"run": cfg.describe(), **settings})


def test_references_get_the_resolution_the_model_actually_got():
    """`spp plot --model timm:resnet50` recorded the model at timm's 224 px and the references at 128: the
    record's settings say what the run resolved (timm's test_resnet: 160 px), and the references follow them."""
    rec = record_run(RunConfig(model="timm:test_resnet", batch_size=2))
    assert rec.settings["resolution"] == 160 and rec.settings["run"]["resolution"] is None
    ref = reference_config(rec, "bn_relu_resnet50")
    assert (ref.resolution, ref.in_chans, ref.num_samples, ref.batch_size, ref.seed, ref.input) == \
        (160, 3, 2, 2, 0, None)
    assert ref.model_kwargs == {}  # a non-built-in model: the references at their own width


def test_cli_and_notebook_plan_the_same_reference_runs(monkeypatch):
    """plot_model and spp.plot(rec, references="auto") go through references_for: the same configs."""
    seen: list[RunConfig] = []

    def fake(cfg, **kw):
        seen.append(cfg)
        return Record(rows=[], stage_ends=[], settings={})

    monkeypatch.setattr(references, "record_cached", fake)
    rec = record_run(RunConfig(model="timm:test_resnet", batch_size=2))
    references_for(rec)
    assert [c.model for c in seen] == ["bn_relu_resnet50", "relu_bn_resnet50", "nf_resnet50"]
    assert {c.resolution for c in seen} == {160}


def test_run_of_a_record_is_its_exact_run_config():
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.25}, input="x.npy", num_samples=5,
                    batch_size=2, seed=9, blocks=("stages.*",), mode="eval", dtype="bfloat16")
    assert run_of(Record(rows=[], stage_ends=[], settings={"run": cfg.describe()})) == cfg


def test_run_of_a_library_record_reads_its_input_settings():
    rec = Record(rows=[], stage_ends=[], settings={"model": "m", "input": "gaussian", "input_shape": [1, 48, 48],
                                                   "num_samples": 6, "batch_size": 3, "seed": 2, "input_std": 0.5,
                                                   "mode": "eval"})
    cfg = run_of(rec)
    assert (cfg.resolution, cfg.in_chans, cfg.num_samples, cfg.batch_size, cfg.seed, cfg.input_std, cfg.mode) == \
        (48, 1, 6, 3, 2, 0.5, "eval")


# ---- token models: transformer references ----------------------------------------------------------------------


def _token_record(layers: int = 12, seq_len: int = 8, width: int = 32) -> tuple[Record, torch.Tensor]:
    """A Pre-LN transformer recorded on random token ids, with the settings a token run writes."""
    model = create_model(f"preln_transformer{layers}", width=width, seq_len=seq_len)
    ids = torch.randint(0, 256, (4, seq_len), generator=torch.Generator().manual_seed(0))
    run = RunConfig(model=f"preln_transformer{layers}", model_kwargs={"width": width, "seq_len": seq_len},
                    input="tokens", batch_size=4)
    settings = {"input": "tokens", "input_shape": [seq_len], "num_samples": 4, "batch_size": 4,
                "run": {**run.describe(), "seq_len": seq_len}}
    return spp.hooks.record(model, ids, settings=settings), ids


def test_token_models_get_transformer_references_at_their_layer_count():
    """24 taps = 12 layers x (attn, mlp): the depth is the 12 distinct layers, not 24 taps."""
    rec, _ = _token_record(layers=12)
    assert rec.num_blocks == 24 and references.model_layers(rec) == 12
    plan = reference_plan(rec)
    assert plan.kind == "transformer" and plan.note == ""
    assert plan.names == ["preln_transformer12", "postln_transformer12", "nf_transformer12"]
    with pytest.raises(SppError, match="a resnet reference cannot take this model's input"):
        reference_plan(rec, "bn_relu_resnet")


def test_transformer_references_get_the_sequence_length_and_run_on_the_same_ids():
    """A reference transformer is built for one sequence length (another is refused): the plan passes the
    model's seq_len (8), so the reference records the very ids the model got; without it, it could not."""
    rec, ids = _token_record(layers=6)
    cfg = reference_config(rec, "postln_transformer6")
    assert cfg.model_kwargs == {"width": 32, "seq_len": 8} and cfg.input == "tokens" and cfg.mode == "train"
    assert not is_same_run(resolved_run(rec), cfg)
    ref = spp.hooks.record(create_model(cfg.model, **cfg.model_kwargs), ids)
    assert ref.num_blocks == 12
    with pytest.raises(SppError, match="built for sequence length 128"):
        spp.hooks.record(create_model(cfg.model, width=32), ids)
    # the model is its own Pre-LN reference: not recorded twice
    assert is_same_run(resolved_run(rec), reference_config(rec, "preln_transformer6"))


def test_a_reference_transformer_recorded_with_seq_len_is_built_for_it_and_not_drawn_twice():
    """`spp plot --model preln_transformer6 --seq-len 16`: the model is built for 16 tokens (its theory is derived
    for one length; built for the default 128 it would refuse 16), and it is its own Pre-LN reference on the same
    run (same width, length and vocabulary), so only the two other families are recorded beside it."""
    cfg = RunConfig(model="preln_transformer6", model_kwargs={"width": 32.0}, seq_len=16, num_samples=2,
                    batch_size=2)
    rec = record_run(cfg)
    assert rec.settings["input_shape"] == [16] and rec.num_blocks == 12
    assert is_same_run(resolved_run(rec), reference_config(rec, "preln_transformer6"))
    refs = references_for(rec)
    assert [r.settings["family"] for r in refs] == ["postln_transformer", "nf_transformer"]
    assert all(r.settings["input_shape"] == [16] for r in refs)


def test_embedding_inputs_give_the_reference_the_embedding_width():
    rec = Record(rows=[], stage_ends=[], settings={"input": "embeddings", "input_shape": [16, 48],
                                                   "run": RunConfig(model="hf:gpt2", input="embeddings").describe()})
    cfg = reference_config(rec, "nf_transformer12")
    assert cfg.model_kwargs == {"seq_len": 16, "width": 48}


def test_no_comparable_reference_is_said_in_one_line():
    flat = Record(rows=[], stage_ends=[], settings={"input": "tensor", "input_shape": [128]})
    plan = reference_plan(flat)
    assert plan.names == [] and plan.note.startswith("no reference drawn:") and "(128,)" in plan.note
    assert "\n" not in plan.note
    small = Record(rows=[], stage_ends=[], settings={"input": "gaussian", "input_shape": [3, 16, 16]})
    assert "--resolution 32" in reference_plan(small).note
    with pytest.raises(SppError, match="--reference cannot be drawn"):
        reference_plan(flat, "nf_resnet")
    assert reference_plan(flat, "none").note == ""

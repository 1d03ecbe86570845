"""Labels say which run a record is: the spec and every option that changed the model; never two alike."""

from __future__ import annotations

from spp.labels import config_label, distinct_labels, run_label, spec_name
from spp.run import RunConfig, record_run


def test_a_label_names_the_options_that_changed_the_model():
    """`--no-ws` and `?ws=false` are the same run, so they get the same label; options after '?' win."""
    assert run_label("nf_resnet600", {"ws": False}) == "nf_resnet600 (ws=False)"
    assert run_label("nf_resnet600?ws=false") == "nf_resnet600 (ws=False)"
    assert run_label("nf_resnet600?alpha=0.3", {"width": 0.25}) == "nf_resnet600 (width=0.25, alpha=0.3)"
    assert run_label("nf_resnet600?ws=false", {"ws": True}) == "nf_resnet600 (ws=False)"
    assert run_label("bn_relu_resnet50", {"norm": "gn"}) == "bn_relu_resnet50 (norm=gn)"
    assert run_label("timm:resnet50", pretrained=True, checkpoint="/data/runs/ft.pt") == \
        "timm:resnet50 (pretrained, checkpoint=ft.pt)"
    assert run_label("nf_resnet600") == "nf_resnet600"


def test_file_specs_are_shortened_to_their_base_name():
    assert spec_name("/home/me/models/net.py:make") == "net.py:make"
    assert spec_name("runs/exported.pt2") == "exported.pt2"


def test_label_option_overrides_and_record_carries_it():
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625, "ws": False}, resolution=32, batch_size=2)
    assert config_label(cfg) == "nf_resnet50 (width=0.0625, ws=False)"
    assert record_run(cfg).label == "nf_resnet50 (width=0.0625, ws=False)"
    assert config_label(RunConfig(model="nf_resnet50", label="mine")) == "mine"


def test_repeated_labels_are_told_apart_by_the_setting_that_differs():
    labels, notes = distinct_labels(["m", "m", "n"], [{"mode": "train"}, {"mode": "eval"}, {}])
    assert labels == ["m [mode=train]", "m [mode=eval]", "n"]
    assert notes == ["2 records are called 'm': told apart by mode"]
    # seeds live in the run settings of records spp made
    labels, _ = distinct_labels(["m", "m"], [{"run": {"seed": 0}}, {"run": {"seed": 1}}])
    assert labels == ["m [seed=0]", "m [seed=1]"]


def test_identical_runs_are_numbered_and_said_so():
    labels, notes = distinct_labels(["m", "m", "m"], [{"seed": 0}] * 3)
    assert labels == ["m", "m #2", "m #3"] and len(set(labels)) == 3
    assert len(notes) == 1 and "no run setting tells them apart" in notes[0] and "--label" in notes[0]
    # a made-up label that collides with a given one is numbered too
    labels, _ = distinct_labels(["m", "m", "m #2"], [{}, {}, {}])
    assert len(set(labels)) == 3

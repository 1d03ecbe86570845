"""The reference-curve cache: hits return exactly what recording returns, keys follow the run, bad entries heal."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import spp.references
from spp import cache
from spp.cli import app
from spp.run import RunConfig

CFG = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4)
REF = "bn_relu_resnet50"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"




def entries(folder) -> list:
    return sorted((folder / "records").glob("*.json")) if (folder / "records").is_dir() else []


def test_cache_dir_follows_env(cache_dir):
    assert cache.cache_dir() == cache_dir


def test_second_reference_is_read_from_cache_and_equal(cache_dir, cache_misses):
    first = spp.references.record_reference(CFG, REF)
    assert cache_misses == [REF] and len(entries(cache_dir)) == 1
    second = spp.references.record_reference(CFG, REF)
    assert cache_misses == [REF]  # not recorded again
    assert second.settings["cached"] is True and "cached" not in first.settings
    assert second.to_frame().equals(first.to_frame())  # every column, bit for bit (NaN where NaN)
    assert second.stage_ends == first.stage_ends
    assert second.settings["family"] == "bn_relu_resnet" and second.settings["samples"] == 4
    doc = json.loads(entries(cache_dir)[0].read_text())  # plain JSON: nothing to unpickle
    assert doc["settings"]["cache_key"] == cache.run_key(spp.references.reference_config(CFG, REF))


def test_no_cache_neither_reads_nor_writes(cache_dir, cache_misses):
    spp.references.record_reference(CFG, REF, use_cache=False)
    assert entries(cache_dir) == []
    spp.references.record_reference(CFG, REF)
    spp.references.record_reference(CFG, REF, use_cache=False)
    assert cache_misses == [REF, REF, REF]


@pytest.mark.parametrize("change", [{"seed": 1}, {"resolution": 64}, {"batch_size": 2}, {"num_samples": 8},
                                    {"mode": "eval"}, {"input_std": 2.0}, {"dtype": "bfloat16"},
                                    {"model_kwargs": {"width": 0.25}}, {"model": "nf_resnet101"}])
def test_key_follows_every_setting(change):
    assert cache.run_key(replace(CFG, **change)) != cache.run_key(CFG)
    assert cache.run_key(replace(CFG)) == cache.run_key(CFG)


def test_only_deterministic_built_in_runs_are_cacheable(tmp_path):
    assert cache.run_key(CFG) is not None
    assert cache.run_key(replace(CFG, model="timm:resnet18")) is None
    assert cache.run_key(replace(CFG, checkpoint="w.pt")) is None
    data = tmp_path / "x.pt"
    data.write_bytes(b"12345")
    key = cache.run_key(replace(CFG, input=str(data)))
    data.write_bytes(b"123456")  # the input file changed: a new key
    assert key is not None and cache.run_key(replace(CFG, input=str(data))) != key


@pytest.mark.parametrize("damage", [b"{not json", b"", b"\x80\x04K\x01.", b'{"format": "spp-record"}'])
def test_damaged_entry_is_ignored_and_rewritten(cache_dir, cache_misses, damage):
    first = spp.references.record_reference(CFG, REF)
    (path,) = entries(cache_dir)
    path.write_bytes(damage)
    again = spp.references.record_reference(CFG, REF)
    assert cache_misses == [REF, REF]
    assert again.to_frame().equals(first.to_frame())
    third = spp.references.record_reference(CFG, REF)  # healed
    assert cache_misses == [REF, REF] and third.settings["cached"] is True


def test_entry_of_another_key_is_ignored(cache_dir, cache_misses):
    ref_cfg = spp.references.reference_config(CFG, REF)
    spp.references.record_reference(CFG, REF)
    (path,) = entries(cache_dir)
    doc = json.loads(path.read_text())
    doc["settings"]["cache_key"] = "0" * 64
    path.write_text(json.dumps(doc))
    assert cache.load(ref_cfg, cache.run_key(ref_cfg)) is None
    spp.references.record_reference(CFG, REF)
    assert cache_misses == [REF, REF]


def test_unwritable_cache_warns_and_records(tmp_path, monkeypatch, cache_misses):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPP_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write the curve cache"):
        rec = spp.references.record_reference(CFG, REF)
    assert rec.num_blocks == 16 and cache_misses == [REF]


def test_plot_records_the_model_and_reads_the_references(tmp_path, cache_dir, cache_misses):
    from spp import commands

    out = tmp_path / "a.png"
    cold = commands.plot_model(CFG, out=str(out), reference="bn_relu_resnet,nf_resnet")
    assert sorted(cache_misses) == ["bn_relu_resnet50"]  # nf_resnet50 at width 0.125 is the model itself
    warm = commands.plot_model(CFG, out=str(out))
    assert sorted(cache_misses) == ["bn_relu_resnet50", "relu_bn_resnet50"]
    assert [r.label for r in cold.references] == ["BN-ReLU-Conv (pre-activation ResNet-V2) 50"]
    assert [r.label for r in warm.references] == [cold.references[0].label, "ReLU-BN-Conv 50"]
    commands.plot_model(CFG, out=str(out), use_cache=False)
    assert len(cache_misses) == 4


def test_cli_no_cache_flag(tmp_path, cache_dir, cache_misses):
    args = ["plot", "--model", "nf_resnet50", "--width", "0.125", "--resolution", "32", "--batch-size", "4",
            "--reference", REF, "--out", str(tmp_path / "p.png")]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    assert cache_misses == [REF]
    assert runner.invoke(app, [*args, "--no-cache"]).exit_code == 0
    assert cache_misses == [REF, REF]


def test_clear_removes_entries(cache_dir):
    spp.references.record_reference(CFG, REF)
    assert cache.clear() == 1 and entries(cache_dir) == []


def test_old_entries_are_pruned(cache_dir):
    folder = cache_dir / "records"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"old{i}.json").write_text("{}")
        os.utime(folder / f"old{i}.json", ns=(i * 10**9, i * 10**9))
    cache._prune(folder, keep=3)
    assert sorted(f.name for f in folder.iterdir()) == ["old2.json", "old3.json", "old4.json"]

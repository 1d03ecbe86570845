"""Comparing records: alignment by name and by depth, planted divergences found, settings warned, CLI output."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from spp.cli import app
from spp.commands import compare_sources
from spp.comparison import compare_records, default_x, log_ratio
from spp.errors import SppError
from spp.files import save_record
from spp.records import Record
from spp.run import RunConfig, record_run

TINY = ["--width", "0.0625", "--resolution", "32", "--batch-size", "2"]


def _record(model: str, label: str, **kwargs) -> Record:
    rec = record_run(RunConfig(model=model, model_kwargs={"width": 0.0625, **kwargs}, resolution=32,
                                 batch_size=2))
    rec.settings["label"] = label
    return rec


@pytest.fixture(scope="module")
def ws() -> Record:
    return _record("nf_resnet50", "ws")


@pytest.fixture(scope="module")
def no_ws() -> Record:
    return _record("nf_resnet50", "no_ws", ws=False)


@pytest.fixture(scope="module")
def deep() -> Record:
    return _record("nf_resnet101", "deep")


def _planted(rec: Record) -> Record:
    """``rec`` with block 5's variance times 100 and block 9's squared mean divided by 10."""
    other = copy.deepcopy(rec)
    other.settings["label"] = "planted"
    other.rows[5]["avg_var"] *= 100
    other.rows[9]["avg_sq_mean"] /= 10
    return other


def test_a_record_against_itself_is_identical(ws):
    comp = compare_records([ws, ws])
    assert comp.labels == ["ws", "ws #2"]  # never two alike, and said so
    assert comp.alignment == "name" and comp.identical
    assert (comp.divergence["log10_ratio"] == 0.0).all()
    assert len(comp.warnings) == 1 and "2 records are called 'ws' and no run setting tells them apart" in \
        comp.warnings[0]


def test_records_of_one_model_are_told_apart_by_their_settings(ws):
    other = copy.deepcopy(ws)
    other.settings["mode"] = "eval"
    comp = compare_records([ws, other])
    assert comp.labels == ["ws [mode=train]", "ws [mode=eval]"]


def test_planted_divergence_is_found_first(ws):
    comp = compare_records([ws, _planted(ws)])
    assert not comp.identical
    top = comp.divergence[comp.divergence["rank"] == 1].set_index("statistic")
    assert top.loc["avg_var", "block"] == 5
    assert top.loc["avg_var", "log10_ratio"] == pytest.approx(2.0, abs=1e-12)
    assert top.loc["avg_var", "other"] == ws.rows[5]["avg_var"] * 100
    assert top.loc["avg_sq_mean", "block"] == 9
    assert top.loc["avg_sq_mean", "log10_ratio"] == pytest.approx(-1.0, abs=1e-12)
    assert top.loc["res_avg_var", "log10_ratio"] == 0.0
    assert (comp.divergence.groupby("statistic").size() == 5).all()
    # Per stage: block 5 is one of stage 2's four blocks, so its geometric-mean ratio is 100 ** (1/4).
    stages = comp.stages.set_index("stage")
    assert stages.loc[2, "avg_var_ratio"] == pytest.approx(100 ** 0.25, rel=1e-12)
    assert stages.loc[2, "blocks"] == "4-7"
    assert stages.loc[1, "avg_var_ratio"] == 1.0 and stages.loc[4, "avg_var_ratio"] == 1.0
    assert stages.loc[3, "avg_sq_mean_ratio"] == pytest.approx(0.1 ** (1 / 6), rel=1e-12)


def test_name_alignment_is_exact(ws, no_ws):
    comp = compare_records([ws, no_ws])
    assert comp.alignment == "name"
    t = comp.table
    assert t["block"].tolist() == list(range(17))
    for stat in ("avg_sq_mean", "avg_var"):
        assert t[f"ws:{stat}"].tolist() == ws.column(stat)
        assert t[f"no_ws:{stat}"].tolist() == no_ws.column(stat)
        expected = [math.log10(b / a) for a, b in zip(ws.column(stat), no_ws.column(stat), strict=True)]
        assert t[f"no_ws:log10_ratio:{stat}"].tolist() == expected


def test_relative_alignment_interpolates_in_log_space(ws, deep):
    comp = compare_records([ws, deep])
    assert comp.alignment == "relative"
    assert "blocks: ws 16, deep 33" in comp.alignment_note
    t = comp.table
    # ws block i sits at depth i/16, i.e. at deep's fractional block 33 i / 16.
    assert t["deep:block"].tolist() == [33 * i / 16 for i in range(17)]
    var = deep.column("avg_var")
    assert t["deep:avg_var"].iloc[0] == var[0] and t["deep:avg_var"].iloc[16] == var[33]
    assert t["deep:avg_var"].iloc[1] == var[2] * (var[3] / var[2]) ** 0.0625  # 33/16 = 2.0625
    assert t["deep:avg_var"].iloc[8] == var[16] * (var[17] / var[16]) ** 0.5  # 33*8/16 = 16.5
    assert default_x([ws, deep])[0] == "relative" and default_x([ws, ws])[0] == "block"


def test_log_ratio_edge_cases():
    assert log_ratio(2.0, 20.0) == 1.0
    assert log_ratio(0.0, 0.0) == 0.0
    assert log_ratio(1.0, 0.0) == -math.inf and log_ratio(0.0, 1.0) == math.inf
    assert log_ratio(1.0, math.nan) == math.inf
    assert math.isnan(log_ratio(math.nan, math.nan))


def test_different_settings_are_listed_first(ws):
    other = copy.deepcopy(ws)
    other.settings.update(label="eval", mode="eval", seed=1)
    comp = compare_records([ws, other])
    assert comp.warnings == ["settings differ (compared anyway): mode: ws=train, eval=eval; seed: ws=0, eval=1"]


def test_no_common_blocks(ws):
    stem_only = Record(rows=[dict(ws.rows[0])], stage_ends=[], settings={"label": "stem"})
    with pytest.raises(SppError, match="no common blocks: stem has no blocks after the stem"):
        compare_records([ws, stem_only])
    renamed = copy.deepcopy(ws)
    for row in renamed.rows[1:]:
        row["name"] = "other." + row["name"]
    with pytest.raises(SppError, match="no common blocks: the records share no tap names"):
        compare_records([ws, renamed], align="name")
    assert compare_records([ws, renamed]).alignment == "relative"  # auto falls back to depth


# ---- the CLI --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """`spp compare` writes compare.png into the working folder by default: a temporary one here."""
    monkeypatch.chdir(tmp_path)


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_cli_model_spec_equals_its_record_file(tmp_path):
    """A model recorded now and the same model recorded to a file before compare exactly equal."""
    rec = tmp_path / "saved.pt"
    assert run("record", "-m", "nf_resnet50", "--out", str(rec), *TINY).exit_code == 0
    result = run("compare", "nf_resnet50", str(rec), *TINY)
    assert result.exit_code == 0, result.output
    assert "aligned by tap name (16 blocks after the stem)" in result.output
    assert "every record equals nf_resnet50 (width=0.0625) exactly at every aligned block" in result.output
    # no --out: the figure goes to compare.png, and the command says where
    assert result.output.rstrip().endswith("wrote compare.png") and (tmp_path / "compare.png").is_file()


def test_cli_compare_labels_say_the_options(tmp_path):
    """`spp compare nf_resnet600 'nf_resnet600?ws=false'`: the tables name both runs by their options."""
    result = run("compare", "nf_resnet50", "nf_resnet50?ws=false", *TINY, "--out", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    assert "largest divergence from nf_resnet50 (width=0.0625)" in result.output.replace("\n", " ")
    assert "ws=False)" in result.output  # the label folds inside its narrow column
    comp = compare_sources(["nf_resnet50", "nf_resnet50?ws=false"], RunConfig(
        model="", model_kwargs={"width": 0.0625}, resolution=32, batch_size=2), out=str(tmp_path / "d.png")).comparison
    assert comp.labels == ["nf_resnet50 (width=0.0625)", "nf_resnet50 (width=0.0625, ws=False)"]


def test_cli_compare_files_figure_and_table(tmp_path, ws, no_ws, deep):
    save_record(ws, tmp_path / "a.pt")
    save_record(no_ws, tmp_path / "b.json")
    save_record(deep, tmp_path / "c.parquet")
    fig, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    result = run("compare", str(tmp_path / "a.pt"), str(tmp_path / "b.json"), "--label", "WS", "--label", "noWS",
                 "--out", str(fig), "--table", str(table))
    assert result.exit_code == 0, result.output
    assert "largest divergence from WS" in result.output and "noWS" in result.output
    assert "x axis: block index (every record has 16 blocks)" in result.output
    with Image.open(fig) as img:
        assert img.format == "PNG" and img.size[0] > 1000
    df = pd.read_csv(table)
    expected = compare_records([ws, no_ws], ["WS", "noWS"]).table
    assert list(df.columns) == list(expected.columns)
    assert df["noWS:avg_var"].tolist() == expected["noWS:avg_var"].tolist() == no_ws.column("avg_var")

    result = run("compare", str(tmp_path / "a.pt"), str(tmp_path / "c.parquet"), "--out", str(fig))
    assert result.exit_code == 0, result.output
    assert "x axis: relative depth (block counts differ: 16, 33)" in result.output
    assert "values interpolated at a's blocks" in result.output


def test_cli_compare_warns_on_different_settings(tmp_path, ws):
    save_record(ws, tmp_path / "a.pt")
    result = run("compare", str(tmp_path / "a.pt"), "nf_resnet50", *TINY, "--mode", "eval")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == "warning: settings differ (compared anyway): mode: a=train, nf_resnet50 (width=0.0625)=eval"


def test_cli_compare_errors_are_one_line(tmp_path, ws):
    save_record(ws, tmp_path / "a.pt")
    save_record(Record(rows=[dict(ws.rows[0])], stage_ends=[], settings={"label": "s"}), tmp_path / "stem.json")
    a = str(tmp_path / "a.pt")
    cases = {
        ("compare", a, str(tmp_path / "missing.pt")): "does not exist",
        ("compare", a, str(tmp_path / "stem.json")): "no common blocks: stem has no blocks after the stem",
        ("compare", a): "compare needs at least two records or models",
        # a bad suffix fails before the (unknown) model would be loaded
        ("compare", a, "no_such_model", "--out", str(tmp_path / "x.gif")): "unknown suffix '.gif'",
        ("compare", a, a, "--table", str(tmp_path / "x.xlsx")): "unknown suffix '.xlsx'",
        ("compare", a, a, "--x", "depth"): "--x must be block or relative",
    }
    for args, message in cases.items():
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(errors(result)) == 1 and message in errors(result)[0], (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "stem.json"]

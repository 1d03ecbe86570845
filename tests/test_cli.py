"""The `spp` command line as a user meets it: real files out, one-line errors, fast help."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from spp.cli import app

TINY = ["--width", "0.0625", "--resolution", "32", "--batch-size", "2"]


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_plot_writes_figure_and_table(tmp_path):
    out = tmp_path / "nf.png"
    result = run("plot", "--model", "nf_resnet50", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 1000
    df = pd.read_csv(tmp_path / "nf.csv")
    assert len(df) == 1 + 16 and list(df["block"]) == list(range(17))
    assert df["expected_var"].iloc[1] == pytest.approx(1.04)
    assert "stage" in result.output and "reference" in result.output


@pytest.mark.parametrize("suffix,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_suffix_picks_format(tmp_path, suffix, magic):
    out = tmp_path / f"fig{suffix}"
    table = tmp_path / "stats.json"
    result = run("plot", "-m", "bn_relu_resnet50", "-o", str(out), "--table", str(table), "--reference", "none",
                 *TINY)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(magic)
    assert len(pd.read_json(table)) == 17


def test_unknown_model_is_one_line_with_close_matches(tmp_path):
    result = run("plot", "--model", "nf_resnet60", "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and "nf_resnet600" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resolution", "16"], "too small"),
        (["--batch-size", "1", "--model", "bn_relu_resnet50"], "--batch-size 1 with BatchNorm"),
        (["--out", "/nonexistent-folder/x.png"], "does not exist"),
        (["--out", "{tmp}/x.gif"], "unknown suffix"),
        (["--table", "{tmp}/x.xlsx"], "unknown suffix"),
        (["--mode", "inference"], "mode"),
        (["--reference", "vgg16"], "unknown reference"),
        (["--model-kwargs", "{bad json"], "not valid JSON"),
        (["--activation", "relu7"], "unknown activation"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["plot", "--model", "nf_resnet50", "--width", "0.0625", "--resolution", "32", "--batch-size", "2",
            "--out", str(tmp_path / "ok.png")]
    result = run(*base, *args)
    assert result.exit_code == 2, result.output
    assert len(error_lines(result)) == 1 and message in result.output
    assert not [p for p in tmp_path.iterdir()], "a file was written despite the error"


def test_nonfinite_activations_are_reported_not_crashed(tmp_path):
    out = tmp_path / "inf.png"
    result = run("plot", "--model", "nf_resnet50", "--input-std", "1e30", "--out", str(out), "--reference", "none",
                 *TINY)
    assert result.exit_code == 3
    assert "NaN/Inf" in result.output and len(error_lines(result)) == 1
    df = pd.read_csv(tmp_path / "inf.csv")
    assert (df["nonfinite"] > 0).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.csv", "inf.png"]  # complete files, no temp files


def test_models_lists_every_reference():
    result = run("models")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert len(names) == 18 + 15 and "nf_resnet600" in names and "relu_bn_resnet288" in names
    assert "nf_transformer96" in names and "postln_transformer6" in names


def test_blocks_shows_taps_and_rules():
    result = run("blocks", "--model", "nf_resnet50", "--width", "0.0625")
    assert result.exit_code == 0
    assert "conv3:output" in result.output and "16 tap points" in result.output


@pytest.mark.parametrize("args", [["--help"], ["plot", "--help"], ["models"], ["blocks", "--help"]])
def test_help_and_models_do_not_import_torch(args):
    code = ("import sys; from spp.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, {args!r}); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "spp", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "plot" in out.stdout

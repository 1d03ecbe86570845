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
    """The table holds every curve of the figure, a `model` column naming each: the model (17 tap points), then
    the two references it is not itself (nf_resnet50 is its own NF reference)."""
    out = tmp_path / "nf.png"
    result = run("plot", "--model", "nf_resnet50", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 1000
    df = pd.read_csv(tmp_path / "nf.csv")
    assert list(df.columns[:2]) == ["model", "block"]
    assert df.groupby("model", sort=False).size().to_dict() == {"nf_resnet50 (width=0.0625)": 17,
                                                                  "BN-ReLU-Conv 50": 17, "ReLU-BN-Conv 50": 17}
    mine = df[df["model"] == "nf_resnet50 (width=0.0625)"]
    assert list(mine["block"]) == list(range(17)) and mine["expected_var"].iloc[1] == pytest.approx(1.04)
    assert "reference BN-ReLU-Conv 50" in result.output and "nf_resnet50 (width=0.0625): 16 tap points" in \
        result.output
    assert f"x axis: block index; wrote {out} and {tmp_path / 'nf.csv'}" in result.output.replace("\n", "")


def test_plot_label_and_x_axis(tmp_path):
    out = tmp_path / "mine.png"
    result = run("plot", "--model", "nf_resnet50", "--out", str(out), "--label", "my net", "--x", "relative",
                 "--reference", "bn_relu_resnet", *TINY)
    assert result.exit_code == 0, result.output
    assert "my net: 16 tap points" in result.output and "x axis: relative depth" in result.output
    assert set(pd.read_csv(tmp_path / "mine.csv")["model"]) == {"my net", "BN-ReLU-Conv 50"}
    from spp.files import load_record

    assert load_record(tmp_path / "mine.csv").label == "my net"  # a plot table reads back as the model's record


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


def test_blocks_shows_the_verdict_of_one_micro_batch():
    """`spp blocks` records one micro-batch: every NF block's identity output == shortcut + branch holds
    (16 verified, axis 1 of NCHW); naming conv2 (a bottleneck's inner conv: a quarter of the output's channels)
    as the branch cannot satisfy it, so every block is refused and the note says why; --no-verify lists only."""
    ok = run("blocks", "--model", "nf_resnet50", "--width", "0.0625")
    rows = [line for line in ok.output.splitlines() if "stages." in line]
    assert ok.exit_code == 0 and len(rows) == 16 and all("verified" in r and "│   1 │" in r for r in rows)
    wrong = run("blocks", "--model", "nf_resnet50", "--width", "0.0625", "--residual-tap", "conv2")
    assert wrong.exit_code == 0, wrong.output
    assert wrong.output.count("refused") >= 16 and "verified" not in wrong.output
    assert "the residual identity fails on the first micro-batch" in wrong.output
    listed = run("blocks", "--model", "nf_resnet50", "--width", "0.0625", "--no-verify")
    assert listed.exit_code == 0 and "verified" not in listed.output and "16 tap points" in listed.output


def test_blocks_prints_each_note_once():
    """torchvision resnet18 with zero_init_residual: the same zero-branch note on all 8 blocks was repeated on
    every row (118 lines for 16 blocks); now each row points to note 1, printed once below the table."""
    result = run("blocks", "--model", "torchvision:resnet18", "--model-kwargs", '{"zero_init_residual": true}')
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note ")]
    assert len(notes) == 1 and notes[0].startswith("note 1: ") and "zero_init_residual" in notes[0]
    assert result.output.count("[note 1]") == 8


def test_sites_are_shown_relative_to_their_block():
    """Block "2"'s site "2.ln2:input" printed as "lninput" (every "2." and "2:" was removed)."""
    from spp.cli import _relative

    assert _relative("2.ln2:input", "2") == "ln2:input"
    assert _relative("2:output", "2") == "output"
    assert _relative("layer1.0.conv3:output", "layer1.0") == "conv3:output"
    assert _relative("stem.conv:output", "2") == "stem.conv:output"


@pytest.mark.parametrize("command", ["plot", "record", "compare", "blocks", "bn"])
def test_help_has_no_bool_hints_and_no_truncated_text(command):
    """At 80 columns: no `<bool>` beside on/off flags (they take no value) and no help cut with '…'."""
    out = subprocess.run([sys.executable, "-m", "spp", command, "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80", "TERM": "dumb"}, check=True).stdout
    assert "<bool>" not in out and "…" not in out
    assert "--help" in out and "<str>" in out  # options with values keep their type


def test_summary_folds_numbers_on_a_narrow_terminal(monkeypatch):
    """At 60 columns the summary cut numbers to '0.36…'; now every column's cells fold, so the column's text,
    read top to bottom, is exactly the numbers in order."""
    import io

    from rich.console import Console

    from spp import cli
    from spp.run import RunConfig, record_run

    rec = record_run(RunConfig(model="relu_bn_resnet50", model_kwargs={"width": 0.0625}, resolution=32,
                               batch_size=2))
    buf = io.StringIO()
    monkeypatch.setattr(cli, "out_console", Console(file=buf, width=60))
    cli._print_summary(rec)
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 60
    body = [line for line in text.splitlines() if line.startswith("│")]
    columns = ["".join(cell.strip() for cell in col) for col in zip(*(line.strip("│").split("│") for line in body),
                                                                       strict=True)]
    stages = rec.stage_summary()
    assert columns[2] == f"{rec.rows[0]['avg_var']:.4g}" + "".join(f"{s['first_var']:.4g}" for s in stages)
    assert columns[4] == f"{rec.rows[0]['avg_sq_mean']:.4g}" + "".join(f"{s['max_sq_mean']:.4g}" for s in stages)
    assert any("e-" in f"{s['max_sq_mean']:.4g}" for s in stages)  # the 1e-14 of ReLU-BN-Conv's stage 1


def test_warnings_are_one_line_each_and_said_once(tmp_path):
    """A folder of 4 images, one corrupt: the model and its 2 references each read it, and the skip used to be
    a raw UserWarning with its source line, three times. Now: one line, once."""
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "9.png").write_bytes(b"not a png")
    result = run("plot", "--model", "nf_resnet50", "--input", str(tmp_path), "--out", str(tmp_path / "x.png"),
                 *TINY)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: --input ") and "using 4 readable ones" in lines[0]
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output


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

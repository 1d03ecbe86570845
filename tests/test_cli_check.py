"""`spp check` and `spp gamma` end to end (CliRunner, tiny models): verdicts, exit codes, the JSON schema, thresholds,
saved records, and the tables on a terminal and in a pipe."""

from __future__ import annotations

import io
import json
import math
import stat

import pytest
from rich.console import Console
from typer.testing import CliRunner

import spp.cli
from spp.cli import app
from spp.verdicts import JSON_SCHEMA, KINDS, LEVELS

TINY = ["--width", "0.0625", "--resolution", "32", "--batch-size", "4"]


def check(*args: str):
    result = CliRunner().invoke(app, ["check", *args])
    assert "Traceback" not in result.output
    return result


def check_json(*args: str) -> tuple[int, dict]:
    result = check(*args, "--json", "-")
    return result.exit_code, json.loads(result.stdout)


def errors(doc: dict) -> set[str]:
    return {f["kind"] for f in doc["findings"] if f["level"] == "error"}


def test_nf_resnet_with_scaled_ws_passes():
    """Scaled WS makes every conv mean-free and variance-preserving: the squared mean stays near 0 and the variance
    follows 1 + k alpha^2 within a stage (linear growth): no finding at error level, exit 0."""
    code, doc = check_json("-m", "nf_resnet50", *TINY)
    assert code == 0 and doc["healthy"] is True and doc["exit_code"] == 0 and not errors(doc)


def test_nf_resnet_without_ws_fails_on_mean_shift():
    """Without WS the ReLU's positive mean E[relu(z)] = 1/sqrt(2 pi) passes through He-init weights whose rows do
    not sum to zero, so the squared channel mean outgrows the variance: mean_shift at error level, its value above
    its threshold (1: |mean| = std), exit 1."""
    code, doc = check_json("-m", "nf_resnet50", "--no-ws", *TINY)
    assert code == 1 and doc["healthy"] is False and errors(doc) == {"mean_shift"}
    shift = next(f for f in doc["findings"] if f["kind"] == "mean_shift")
    assert shift["threshold"] == 1.0 and shift["value"] > shift["threshold"]


def test_bn_relu_conv_in_eval_mode_fails():
    """An initialised BatchNorm in eval mode is the identity (running mean 0, variance 1), so each branch scales
    with its input: the variance grows geometrically instead of linearly, and the ReLU's mean is not removed
    either. In train mode the same model is healthy (each branch adds ~(1 - 1/pi), linear growth)."""
    code, doc = check_json("-m", "bn_relu_resnet50", "--mode", "eval", "--width", "0.125", "--resolution", "32",
                           "--batch-size", "4")
    assert code == 1 and errors(doc) == {"mean_shift", "variance_growth"}
    growth = next(f for f in doc["findings"] if f["kind"] == "variance_growth")
    assert growth["value"] > growth["threshold"]
    code, doc = check_json("-m", "bn_relu_resnet50", "--width", "0.125", "--resolution", "32", "--batch-size", "4")
    assert code == 0 and not errors(doc)


def test_nan_inf_exit_3():
    """Inputs of std 1e30 overflow float32 within a few blocks: a nonfinite finding and exit code 3."""
    code, doc = check_json("-m", "nf_resnet50", "--input-std", "1e30", *TINY)
    assert code == 3 and doc["exit_code"] == 3 and "nonfinite" in errors(doc)


def test_json_schema():
    """The documented schema: schema, healthy, exit_code, counts per level, findings with kind / level / blocks
    (first <= last) / value / threshold / message, and the thresholds used."""
    _, doc = check_json("-m", "nf_resnet50", "--no-ws", *TINY)
    assert doc["schema"] == JSON_SCHEMA
    assert set(doc) >= {"schema", "healthy", "exit_code", "counts", "findings", "thresholds"}
    assert set(doc["counts"]) == set(LEVELS)
    assert sum(doc["counts"].values()) == len(doc["findings"]) > 0
    for f in doc["findings"]:
        assert set(f) == {"kind", "level", "blocks", "value", "threshold", "message"}
        assert f["kind"] in KINDS and f["level"] in LEVELS
        first, last = f["blocks"]
        assert isinstance(first, int) and 0 <= first <= last <= 16
        assert f["value"] is None or math.isfinite(f["value"])
        assert isinstance(f["message"], str) and f["message"]
    assert doc["thresholds"]["max_mean_ratio"] == 1.0 and doc["thresholds"]["max_growth"] is None


def test_json_file_and_saved_record_give_the_same_verdicts(tmp_path):
    """`spp check REC` on the record of a run gives the verdicts `spp check --model` gives on the same run; the
    JSON file is written with the umask's mode."""
    rec = tmp_path / "nows.json"
    made = CliRunner().invoke(app, ["record", "-m", "nf_resnet50", "--no-ws", *TINY, "-o", str(rec)])
    assert made.exit_code == 0, made.output
    live = tmp_path / "live.json"
    first = check("-m", "nf_resnet50", "--no-ws", *TINY, "--json", str(live))
    second = check(str(rec), "--json", str(tmp_path / "saved.json"))
    assert first.exit_code == second.exit_code == 1
    a, b = json.loads(live.read_text()), json.loads((tmp_path / "saved.json").read_text())
    assert a["findings"] == b["findings"]
    assert stat.S_IMODE(live.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_thresholds_from_options_and_toml(tmp_path):
    """The measured mean ratio of the no-WS model (value) fails at the default threshold 1; with the threshold set
    above that value, by option or TOML file, the same record passes (exit 0)."""
    rec = tmp_path / "nows.json"
    assert CliRunner().invoke(app, ["record", "-m", "nf_resnet50", "--no-ws", *TINY, "-o", str(rec)]).exit_code == 0
    _, doc = check_json(str(rec))
    value = next(f["value"] for f in doc["findings"] if f["kind"] == "mean_shift")
    code, relaxed = check_json(str(rec), "--max-mean-ratio", str(2 * value))
    assert code == 0 and "mean_shift" not in errors(relaxed) and relaxed["thresholds"]["max_mean_ratio"] == 2 * value
    toml = tmp_path / "limits.toml"
    toml.write_text(f"[thresholds]\nmax_mean_ratio = {2 * value!r}\n")
    code, from_file = check_json(str(rec), "--thresholds", str(toml))
    assert code == 0 and from_file["thresholds"]["max_mean_ratio"] == 2 * value
    code, overridden = check_json(str(rec), "--thresholds", str(toml), "--max-mean-ratio", "1")
    assert code == 1 and "mean_shift" in errors(overridden)


def test_plain_lines_when_piped_and_a_table_on_a_terminal(monkeypatch):
    piped = check("-m", "nf_resnet50", "--no-ws", *TINY)
    assert piped.exit_code == 1
    lines = piped.output.splitlines()
    assert any(line.startswith("error: mean_shift: blocks ") for line in lines)
    assert "spp check nf_resnet50 (width=0.0625, ws=False) (16 blocks): unhealthy; 1 error(s)" in piped.output
    screen = io.StringIO()
    monkeypatch.setattr(spp.cli, "out_console", Console(file=screen, force_terminal=True, width=200))
    assert check("-m", "nf_resnet50", "--no-ws", *TINY).exit_code == 1
    drawn = screen.getvalue()
    assert "what it means" in drawn and "mean_shift" in drawn and "━" in drawn


def test_gamma_relu_matches_its_closed_form():
    """relu: gamma = 1 / sqrt(Var relu(z)) with E[relu] = 1/sqrt(2 pi), E[relu^2] = 1/2, so
    gamma = 1 / sqrt(1/2 - 1/(2 pi)) = sqrt(2 / (1 - 1/pi)) = 1.712859; DeepMind's table has 1.7139588."""
    result = CliRunner().invoke(app, ["gamma", "relu", "x * torch.sigmoid(1.702*x)"])
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.output.splitlines() if line.startswith("relu "))
    closed = math.sqrt(2 / (1 - 1 / math.pi))
    assert float(row[1]) == pytest.approx(closed, abs=2e-6) and float(row[2]) == pytest.approx(closed, abs=2e-6)
    assert float(row[3]) == pytest.approx(1.7140, abs=1e-4)
    assert float(row[-2]) == pytest.approx(1 / math.sqrt(2 * math.pi), abs=2e-6)
    assert float(row[-1]) == pytest.approx(0.5, abs=2e-6)
    assert any(line.startswith("x * torch.sigmoid(1.702*x)") for line in result.output.splitlines())


def test_gamma_table_on_a_terminal(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(spp.cli, "out_console", Console(file=screen, force_terminal=True, width=200))
    assert CliRunner().invoke(app, ["gamma", "gelu"]).exit_code == 0
    assert "table (DeepMind/timm)" in screen.getvalue() and "1.70" in screen.getvalue()

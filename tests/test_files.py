"""Record files: every format round-trips bit for bit; bad, foreign and malicious files fail in one line."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import pickle
import signal
import stat
import struct
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import spp
from spp.cli import app
from spp.errors import SppError
from spp.files import (
    RECORD_SUFFIXES,
    commit_outputs,
    float_token,
    load_record,
    parse_float,
    save_record,
    sidecar,
    write_table,
)
from spp.records import Record
from spp.run import RunConfig, record_run
from spp.schema import COLUMNS, FORMAT_VERSION, NAMES

TINY = ["--width", "0.0625", "--resolution", "32", "--batch-size", "2"]
FORMATS = [s.lstrip(".") for s in RECORD_SUFFIXES]


def _float(bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(bits))[0]


NEG_NAN = _float("fff8000000000000")  # what x86 produces for 0/0: sign bit set
ODD_NAN = _float("7ff800000000dead")  # a NaN with a payload


def bits(value):
    """Floats as their 8 bytes, recursively, so NaN == NaN and -0.0 != 0.0 in comparisons."""
    if isinstance(value, float):
        return ("float", struct.pack(">d", value))
    if isinstance(value, dict):
        return {k: bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [bits(v) for v in value]
    return (type(value).__name__, value)


@pytest.fixture(scope="module")
def real_record() -> Record:
    return record_run(RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625}, resolution=32,
                                  batch_size=2))


@pytest.fixture
def record(real_record) -> Record:
    """A real record with every awkward float a file format can mangle, in rows and settings."""
    rows = [dict(r) for r in real_record.rows]
    for row, value in zip(rows[1:], (NEG_NAN, ODD_NAN, math.inf, -math.inf, -0.0, 5e-324, 1 / 3, 1e308),
                          strict=False):
        row["avg_var"] = value
    rows[2]["note"] = 'a "quoted", multi\nline note; with commas'
    settings = {**real_record.settings, "torch": str(real_record.settings["torch"]),
                "nested": {"values": [math.nan, NEG_NAN, -math.inf, 0.1, None, True], "empty": {}}}
    return Record(rows=rows, stage_ends=list(real_record.stage_ends), settings=settings)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_exact(tmp_path, record, fmt):
    path = tmp_path / f"rec.{fmt}"
    assert save_record(record, path) == path
    loaded = spp.load_record(path)
    assert bits(loaded.rows) == bits(record.rows)
    assert loaded.stage_ends == record.stage_ends == [3, 7, 13, 16]
    assert bits(loaded.settings) == bits(record.settings)
    assert loaded.version == FORMAT_VERSION
    assert list(loaded.rows[0]) == list(NAMES)
    # Saving what was loaded writes the same bytes (text formats) or the same record again (binary ones).
    again = tmp_path / f"again.{fmt}"
    save_record(loaded, again)
    if fmt in ("json", "csv"):
        assert again.read_bytes() == path.read_bytes()
    assert bits(load_record(again).rows) == bits(record.rows)


def test_float_tokens_name_exact_bits():
    for value in (math.nan, NEG_NAN, ODD_NAN, math.inf, -math.inf):
        token = float_token(value)
        assert isinstance(token, str)
        assert struct.pack(">d", parse_float(token)) == struct.pack(">d", value)
    assert float_token(NEG_NAN) == "-NaN" and float_token(ODD_NAN) == "NaN(0x7ff800000000dead)"
    assert float_token(0.1) == 0.1


def test_pt_holds_plain_data_for_weights_only_load(tmp_path, record):
    path = tmp_path / "rec.pt"
    save_record(record, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "spp-record" and raw["version"] == FORMAT_VERSION
    assert raw["data"]["avg_var"].dtype == torch.float64
    assert raw["data"]["count"].dtype == torch.int64
    assert raw["data"]["name"] == [r["name"] for r in record.rows]
    assert [struct.pack(">d", v) for v in raw["data"]["avg_var"].tolist()] == [
        struct.pack(">d", r["avg_var"]) for r in record.rows]


def test_csv_and_parquet_read_as_plain_tables(tmp_path, record):
    save_record(record, tmp_path / "rec.csv")
    save_record(record, tmp_path / "rec.parquet")
    assert json.loads(sidecar(tmp_path / "rec.csv").read_text())["stage_ends"] == [3, 7, 13, 16]
    for df in (pd.read_csv(tmp_path / "rec.csv"), pd.read_parquet(tmp_path / "rec.parquet")):
        assert list(df.columns) == list(NAMES)
        assert df["avg_sq_mean"].tolist() == [r["avg_sq_mean"] for r in record.rows]
        assert df["avg_var"].dtype == "float64"
        assert df["avg_var"].isna().tolist()[:4] == [False, True, True, False]
        assert df["avg_var"].tolist()[3:5] == [math.inf, -math.inf]
    meta = json.loads(pq.read_schema(tmp_path / "rec.parquet").metadata[b"spp.record"])
    assert meta["settings"]["nested"]["values"][0] == {"$float": "NaN"}


def test_plot_tables_load_as_records(tmp_path, real_record):
    """A table from `spp plot --table` is no record file, but holds the numbers: it loads, settings unknown."""
    # write_table's JSON keeps 10 significant digits (pandas' default); CSV and Parquet keep every bit.
    for fmt, rel in (("csv", 0.0), ("parquet", 0.0), ("json", 1e-9)):
        path = tmp_path / f"table.{fmt}"
        write_table(real_record.to_frame(), str(path))
        loaded = load_record(path)
        assert loaded.stage_ends == real_record.stage_ends
        assert loaded.label == "table"
        for got, want in zip(loaded.rows, real_record.rows, strict=True):
            assert (got["block"], got["name"], got["stage"]) == (want["block"], want["name"], want["stage"])
            for key in ("avg_sq_mean", "avg_var"):
                assert got[key] == pytest.approx(want[key], rel=rel, abs=0.0)
            assert math.isnan(got["res_avg_var"]) == math.isnan(want["res_avg_var"])


def _bump_version(path: pathlib.Path, fmt: str, version: int) -> None:
    if fmt == "pt":
        raw = torch.load(path, weights_only=True)
        torch.save({**raw, "version": version}, path)
    elif fmt == "json":
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "version": version}))
    elif fmt == "csv":
        doc = json.loads(sidecar(path).read_text())
        sidecar(path).write_text(json.dumps({**doc, "version": version}))
    else:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"spp.record"])
        pq.write_table(table.replace_schema_metadata({b"spp.record": json.dumps({**meta, "version": version})}),
                       path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_newer_format_asks_for_upgrade(tmp_path, real_record, fmt):
    path = tmp_path / f"new.{fmt}"
    save_record(real_record, path)
    _bump_version(path, fmt, FORMAT_VERSION + 1)
    with pytest.raises(SppError) as err:
        load_record(path)
    assert str(err.value) == (f"record {path} was written by a newer spp (format {FORMAT_VERSION + 1}, this spp "
                              f"reads up to {FORMAT_VERSION}); upgrade spp")


def test_missing_file(tmp_path):
    with pytest.raises(SppError, match=r"record .*nope\.pt does not exist"):
        load_record(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "make,looks_like",
    [
        (lambda p: torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(120)}, p),
         "a state_dict with 120 tensors"),
        (lambda p: torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(1)}}, p),
         "a checkpoint with a state_dict of 1 tensors under 'state_dict'"),
        (lambda p: torch.save(torch.zeros(3, 4), p), "a tensor of shape (3, 4)"),
        (lambda p: torch.save(torch.nn.Linear(2, 2), p), "a pickle of Python objects (torch.nn.modules.linear.Linear)"),
        (lambda p: p.write_bytes(b"not a torch file"), "no PyTorch file at all"),
    ],
)
def test_foreign_pt_files_say_what_they_look_like(tmp_path, make, looks_like):
    path = tmp_path / "thing.pt"
    make(path)
    with pytest.raises(SppError) as err:
        load_record(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not an spp record: it looks like {looks_like}")
    assert "\n" not in message


def test_foreign_tables_say_what_they_look_like(tmp_path):
    (tmp_path / "t.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(SppError, match=r"looks like a CSV without the SPP columns \(block, .* it has epoch, loss"):
        load_record(tmp_path / "t.csv")
    (tmp_path / "t.json").write_text('{"epoch": 1}')
    with pytest.raises(SppError, match="looks like a JSON object with keys 'epoch'"):
        load_record(tmp_path / "t.json")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(SppError, match=r"unknown suffix '\.txt'"):
        load_record(tmp_path / "t.txt")


class _Touch:
    """Unpickling this would create a file (and could run anything else)."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


class _System:
    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_Touch, _System])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_runs_nothing(tmp_path, payload, writer):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"format": "spp-record", "version": 1, "data": payload(target)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(SppError) as err:
        load_record(path)
    assert "is not an spp record" in str(err.value) and "\n" not in str(err.value)
    assert not target.exists()
    result = CliRunner().invoke(app, ["compare", str(path), str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not target.exists()


def test_save_checks_suffix_and_plain_settings(tmp_path, real_record):
    with pytest.raises(SppError, match=r"unknown suffix '\.txt'; use one of \.pt, \.json, \.parquet, \.csv"):
        save_record(real_record, tmp_path / "rec.txt")
    bad = Record(rows=real_record.rows, stage_ends=real_record.stage_ends, settings={"device": torch.device("cpu")})
    with pytest.raises(SppError, match=r"settings\['device'\] is a device"):
        save_record(bad, tmp_path / "rec.json")
    assert not list(tmp_path.iterdir())


# ---- the CLI --------------------------------------------------------------------------------------------------
def test_cli_record_equals_a_direct_recording(tmp_path):
    out = tmp_path / "b.pt"
    result = CliRunner().invoke(app, ["record", "--model", "nf_resnet50", "--no-ws", "--seed", "3", "--out",
                                      str(out), *TINY])
    assert result.exit_code == 0, result.output
    loaded = load_record(out)
    direct = record_run(RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625, "ws": False},
                                    resolution=32, batch_size=2, seed=3))
    assert bits(loaded.rows) == bits(direct.rows)
    assert loaded.stage_ends == direct.stage_ends
    s = loaded.settings
    assert s["model_kwargs"] == {"width": 0.0625, "ws": False} and s["input_shape"] == [3, 32, 32]
    assert (s["seed"], s["mode"], s["num_samples"], s["batch_size"]) == (3, "train", 2, 2)
    assert s["timm"] and s["torch"] and s["spp"] == spp.__version__ and s["created"]
    assert s["run"]["model"] == "nf_resnet50"


def test_cli_record_rejects_bad_suffix_before_recording(tmp_path):
    # The model name is wrong too: the suffix error wins, so nothing was loaded or recorded first.
    result = CliRunner().invoke(app, ["record", "--model", "no_such_model", "--out", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        f"error: --out '{tmp_path / 'r.txt'}': unknown suffix '.txt'; use one of .pt, .json, .parquet, .csv"]
    assert not list(tmp_path.iterdir())


# ---- commit_outputs: every output replaces its old file, or none does ---------------------------------------------
def _old_outputs(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    a, b = folder / "fig.png", folder / "table.csv"
    a.write_bytes(b"old figure")
    b.write_text("old table\n")
    return a, b


def _write(text: str):
    return lambda tmp: pathlib.Path(tmp).write_text(text)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_new_outputs_get_the_umask_mode(tmp_path, mask, mode):
    """A new file is created 0666 & ~umask, as open() would create it (not mkstemp's 0600)."""
    with _umask(mask):
        commit_outputs([(tmp_path / "a.csv", _write("a")), (tmp_path / "b.json", _write("b"))])
        save_record(_tiny_record(), tmp_path / "r.csv")
    for name in ("a.csv", "b.json", "r.csv", "r.csv.meta.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o640])
def test_replaced_outputs_keep_their_mode(tmp_path, mode):
    a, b = _old_outputs(tmp_path)
    for p in (a, b):
        os.chmod(p, mode)
    with _umask(0o077):  # the umask would say 0600: an existing file keeps its own mode instead
        commit_outputs([(a, _write("new figure")), (b, _write("new table"))])
    assert (a.read_text(), b.read_text()) == ("new figure", "new table")
    assert {stat.S_IMODE(p.stat().st_mode) for p in (a, b)} == {mode}


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                     ValueError("writer bug")], ids=["disk_full", "sigint", "error"])
def test_a_failing_output_leaves_every_old_output(tmp_path, failure):
    """The figure is written, the table fails (a full disk, Ctrl-C, a bug): the old figure is still there, not
    the new one, and no temporary file is left."""
    a, b = _old_outputs(tmp_path)

    def broken(tmp):
        pathlib.Path(tmp).write_text("partial")
        raise failure

    with pytest.raises(type(failure)):
        commit_outputs([(a, _write("new figure")), (b, broken)])
    assert (a.read_bytes(), b.read_text()) == (b"old figure", "old table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "table.csv"]


def test_a_failing_rename_puts_back_the_outputs_already_replaced(tmp_path, monkeypatch):
    a, b = _old_outputs(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst) == str(b) and ".tmp" in str(src):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SppError, match=r"could not put .*table\.csv in place \(\[Errno 5\] I/O error\); every "):
        commit_outputs([(a, _write("new figure")), (b, _write("new table"))])
    assert (a.read_bytes(), b.read_text()) == (b"old figure", "old table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "table.csv"]


def test_sigint_during_the_swap_waits_until_every_output_is_in_place(tmp_path, monkeypatch):
    """Ctrl-C arriving between two renames is held back: both new outputs land, then KeyboardInterrupt."""
    a, b = _old_outputs(tmp_path)
    real = os.replace
    sent = []

    def replace(src, dst):
        if not sent:
            sent.append(dst)
            signal.raise_signal(signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        commit_outputs([(a, _write("new figure")), (b, _write("new table"))])
    assert sent and (a.read_text(), b.read_text()) == ("new figure", "new table")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "table.csv"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_symlinked_output_is_written_through_its_link(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    commit_outputs([(link, _write("new"))])
    assert link.is_symlink() and real.read_text() == "new"


SIGTERM_SCRIPT = """
import os, pathlib, signal, sys, time
from spp.files import commit_outputs
folder = pathlib.Path(sys.argv[1])

def dies(tmp):
    pathlib.Path(tmp).write_text("partial")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

commit_outputs([(folder / "fig.png", lambda t: pathlib.Path(t).write_text("new")), (folder / "table.csv", dies)])
print("not reached")
"""


def test_sigterm_while_writing_leaves_old_outputs_and_no_temporary_file(tmp_path):
    """SIGTERM (default action: end the process) unwinds the write first: the process still dies by SIGTERM, the
    old outputs are intact and no ``.NAME.*.tmp`` file is left beside them."""
    a, b = _old_outputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    assert (a.read_bytes(), b.read_text()) == (b"old figure", "old table\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "table.csv"]


def test_a_csv_record_and_its_sidecar_are_one_unit(tmp_path, monkeypatch):
    import spp.files as files

    path = tmp_path / "r.csv"
    save_record(_tiny_record(), path)
    before = (path.read_bytes(), sidecar(path).read_bytes())

    def full(rows, tmp, header):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_save_csv", full)
    changed = Record(rows=_tiny_record().rows, stage_ends=[1], settings={"label": "changed"})
    with pytest.raises(OSError):
        save_record(changed, path)
    assert (path.read_bytes(), sidecar(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.csv.meta.json"]


# ---- reading: bounded, every field validated, in every format -------------------------------------------------
def _tiny_record() -> Record:
    rows = []
    for i in range(2):
        row = {c.name: c.python_type() for c in COLUMNS}  # 0, 0.0 or "" by the column's type
        row.update(block=i, layer=i, branch="", name=f"b{i}", stage=i, avg_sq_mean=0.1, avg_var=1.0 + i,
                   res_avg_var=float("nan") if i == 0 else 0.5, expected_var=float("nan"), channels=4, count=8,
                   nonfinite=0, module="", output_site="", residual_site="", stream="", rule="", note="")
        rows.append({n: row[n] for n in NAMES})
    return Record(rows=rows, stage_ends=[1], settings={"label": "tiny"})


def _tamper(path: pathlib.Path, change) -> None:
    """Rewrite the header (and rows) of a saved record through ``change(doc)``, in the file's own format."""
    suffix = path.suffix
    if suffix == ".json":
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    elif suffix == ".csv":
        doc = json.loads(sidecar(path).read_text())
        change(doc)
        sidecar(path).write_text(json.dumps(doc))
    elif suffix == ".parquet":
        table = pq.read_table(path)
        doc = json.loads(table.schema.metadata[b"spp.record"])
        change(doc)
        pq.write_table(table.replace_schema_metadata({b"spp.record": json.dumps(doc)}), path)
    else:
        doc = torch.load(path, weights_only=True)
        change(doc)
        torch.save(doc, path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(stage_ends=[1000, -5]), "stage end 1000 is not a row index of its 2 rows"),
    (lambda d: d.update(stage_ends=[]), "its last stage ends at row None, not at its last row 1"),
    (lambda d: d.update(stage_ends=[True]), "its stage ends are [True], not a list of row indices"),
    (lambda d: d.update(version=0), "its format version is 0"),
    (lambda d: d.update(version=FORMAT_VERSION + 1), "was written by a newer spp"),
    (lambda d: d.update(types={**d["types"], "count": "float"}), "column 'count' is float, not int"),
], ids=["ends_outside", "ends_missing", "ends_bool", "version_zero", "version_newer", "count_type"])
def test_damaged_headers_are_refused_in_every_format(tmp_path, fmt, change, message):
    path = tmp_path / f"r.{fmt}"
    save_record(_tiny_record(), path)
    _tamper(path, change)
    with pytest.raises(SppError) as err:
        load_record(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_negative_counts_are_refused(tmp_path):
    path = tmp_path / "r.json"
    save_record(_tiny_record(), path)
    doc = json.loads(path.read_text())
    doc["rows"][1]["channels"] = -4
    path.write_text(json.dumps(doc))
    with pytest.raises(SppError, match=r"row 1 has channels -4 \(negative\)"):
        load_record(path)
    doc["rows"][1]["channels"] = 4.5
    path.write_text(json.dumps(doc))
    with pytest.raises(SppError, match=r"not a whole number: 4\.5"):
        load_record(path)


def test_plain_tables_are_validated_too(tmp_path):
    """A plot table whose block column goes backwards is refused (stage ends are derived from it)."""
    path = tmp_path / "t.csv"
    path.write_text("block,name,stage,avg_sq_mean,avg_var,res_avg_var,channels,count,nonfinite\n"
                    "0,stem,0,0.1,1.0,,4,8,0\n2,b2,1,0.1,1.0,0.5,4,8,0\n1,b1,1,0.1,1.0,0.5,4,8,0\n")
    with pytest.raises(SppError, match=r"block indices do not increase at row 2 \(2 then 1\)"):
        load_record(path)


def test_record_files_are_checked_before_they_are_read(tmp_path):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    with pytest.raises(SppError, match=r"r\.json is a pipe, not a regular file"):
        load_record(fifo)  # a read would block forever
    (tmp_path / "d.json").mkdir()
    with pytest.raises(SppError, match=r"d\.json is a folder, not a file"):
        load_record(tmp_path / "d.json")
    (tmp_path / "e.json").write_text("")
    with pytest.raises(SppError, match=r"e\.json is empty \(0 bytes\)"):
        load_record(tmp_path / "e.json")


# ---- outputs written as a unit ------------------------------------------------------------------------------------
def test_commit_outputs_writes_all_or_nothing_with_the_usual_mode(tmp_path):
    """Two outputs written together: both appear, readable as a plain open() would make them (0666 less the
    umask, not mkstemp's 0600); when the second writer fails, neither target changes and no temporary is left."""
    from spp.files import commit_outputs

    a, b = tmp_path / "fig.png", tmp_path / "table.csv"
    commit_outputs([(a, lambda t: pathlib.Path(t).write_text("A")), (b, lambda t: pathlib.Path(t).write_text("B"))])
    umask = os.umask(0)
    os.umask(umask)
    assert a.read_text() == "A" and b.read_text() == "B"
    assert (a.stat().st_mode & 0o777) == (b.stat().st_mode & 0o777) == 0o666 & ~umask

    def fail(tmp: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit_outputs([(a, lambda t: pathlib.Path(t).write_text("new")), (b, fail)])
    assert a.read_text() == "A" and b.read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "table.csv"]

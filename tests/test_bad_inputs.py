"""The bad-input suite (issue 13): every bad value, path, file and environment a careful tester tried, each a clear
refusal. Every CLI case asserts the exit code, exactly one output line (``error: ...``) naming the problem, no
traceback, and that no file of the user's changed: every file in the user's folder has the same bytes and mode as
before, and no file appeared. Library cases assert one SppError line naming the problem.

The model is the issue's small one: ``nf_resnet50 --width 0.25 --resolution 32 --batch-size 4``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import spp
from spp.cli import app
from spp.errors import SppError
from spp.files import commit_outputs, save_record
from spp.inputs import GaussianInput, load_tensor_file
from spp.loading import load_model
from spp.models import create_model
from spp.run import RunConfig, record_run
from spp.verdicts import Thresholds

SMALL = ["--width", "0.25", "--resolution", "32", "--batch-size", "4"]
PLOT = ["plot", "-m", "nf_resnet50", *SMALL, "--reference", "none", "-o", "{u}/new.png"]
RECORD = ["record", "-m", "nf_resnet50", *SMALL, "-o", "{u}/new.json"]
FAC = "{u}/fac.py"

FACTORIES = '''
import torch
from torch import nn


class Block(nn.Module):
    spp_residual = "conv"

    def __init__(self, w):
        super().__init__()
        self.conv = nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class Net(nn.Module):
    def __init__(self, mode="ok", w=4):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.blocks = nn.Sequential(Block(w), Block(w))
        self.mode = mode

    def forward(self, x):
        y = self.blocks(self.stem(x))
        if self.mode == "exit":
            raise SystemExit(4)
        if self.mode == "raise":
            raise ValueError("the forward is broken")
        if self.mode == "interrupt":
            raise KeyboardInterrupt
        return y


def ok(**kw):
    return Net()


def fwd_exit(**kw):
    return Net("exit")


def fwd_raise(**kw):
    return Net("raise")


def fwd_interrupt(**kw):
    return Net("interrupt")


def raises_value(**kw):
    raise ValueError("my factory is broken")


def raises_type_inside(**kw):
    return None + 1


def exits(**kw):
    raise SystemExit(3)


def interrupts(**kw):
    raise KeyboardInterrupt


def needs_depth(depth):
    return Net()


def not_a_module(**kw):
    return 42


class Plain(nn.Module):
    """Blocks spp finds by tracing the forward (no spp_residual): discovery runs this forward symbolically."""

    def __init__(self, w=4):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.c1 = nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x):
        raise SystemExit(7)


def trace_exit(**kw):
    return Plain()
'''


# ---- the user's folder ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Files that cost a model run to make (a real record, a torch.export archive), made once and copied per test."""
    root = tmp_path_factory.mktemp("made")
    rec = record_run(RunConfig(model="nf_resnet50", model_kwargs={"width": 0.25}, resolution=32, batch_size=4))
    save_record(rec, root / "a.json")
    save_record(rec, root / "rec.csv")

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x)

    torch.export.save(torch.export.export(Tiny(), (torch.randn(2, 3, 8, 8),)), str(root / "m.pt2"))
    return root


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


def _liar_pt(path: Path) -> None:
    """A .pt whose tensor claims 10**9 elements over a 7-element storage."""
    torch.save(torch.arange(7, dtype=torch.float32), str(path))
    with zipfile.ZipFile(path) as z:
        items = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in items if n.endswith("data.pkl"))
    data = items[name]
    at = data.index(b"K\x00K\x07\x85") + 2  # offset 0, then size (7,): BININT1 7, TUPLE1
    items[name] = data[:at] + b"J" + struct.pack("<i", 10**9) + data[at + 2:]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for n, b in items.items():
            out.writestr(n, b)


@pytest.fixture
def user(tmp_path, made) -> Path:
    """The user's folder: their files (inputs, records, earlier outputs) that no failing command may change."""
    u = tmp_path / "user"
    u.mkdir()
    (u / "fac.py").write_text(FACTORIES)
    (u / "broken_import.py").write_text("import torch\nraise RuntimeError('cannot import me')\ndef make(): pass\n")
    (u / "empty.npy").write_bytes(b"")
    (u / "text.npy").write_text("hello, not numpy\n")
    np.save(u / "float.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    (u / "trunc.npy").write_bytes((u / "float.npy").read_bytes()[:500])
    np.save(u / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(u / "bool.npy", np.zeros((4, 3, 32, 32), dtype=bool))
    np.save(u / "r2.npy", np.zeros((4, 3), dtype=np.float32))
    np.save(u / "int.npy", np.zeros((4, 3, 32, 32), dtype=np.int64))
    np.save(u / "u8.npy", np.zeros((4, 3, 32, 32), dtype=np.uint8))
    torch.save(torch.zeros(4, 3, 32, 32, dtype=torch.complex64), str(u / "complex.pt"))
    torch.save(torch.zeros(4, 3, 32, 32).to_sparse(), str(u / "sparse.pt"))
    _liar_pt(u / "liar.pt")
    (u / "text.pt").write_text("just text\n")
    (u / "text.ts").write_text("not a model\n")
    pt2 = (made / "m.pt2").read_bytes()
    (u / "trunc.pt2").write_bytes(pt2[: len(pt2) // 2])
    (u / "ck.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle of {}: only its name matters here
    (u / "sub").mkdir()
    (u / "noimg").mkdir()
    (u / "noimg" / "readme.txt").write_text("no images here\n")
    (u / "imgs").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(u / "imgs" / name)
    shutil.copy(made / "a.json", u / "a.json")
    shutil.copy(made / "a.json", u / "b.json")
    shutil.copy(made / "rec.csv", u / "rec.csv")
    shutil.copy(made / "rec.csv.meta.json", u / "rec.csv.meta.json")
    shutil.copy(made / "rec.csv", u / "nf.csv")  # `spp record --out nf.csv` earlier: a record next to nf.png
    shutil.copy(made / "rec.csv.meta.json", u / "nf.csv.meta.json")
    (u / "data.csv").write_text("subject,score\nalice,3\nbob,4\n")  # the user's own table
    doc = _doc(made / "a.json")
    for name, change in {
        "stage_ends.json": {"stage_ends": [1000, -5]},
        "unordered.json": {"stage_ends": [7, 3, 13, 16]},
        "version99.json": {"version": 99},
        "version0.json": {"version": 0},
        "badtypes.json": {"types": {**doc["types"], "avg_var": "complex"}},
    }.items():
        (u / name).write_text(json.dumps({**doc, **change}))
    negative = json.loads(json.dumps(doc))
    negative["rows"][3]["count"] = -5
    (u / "negcount.json").write_text(json.dumps(negative))
    deep = "[" * 100_000 + "]" * 100_000
    (u / "deep.json").write_text(json.dumps({**doc, "settings": "X"}).replace('"X"', deep))
    (u / "empty_rows.json").write_text(json.dumps({**doc, "rows": [], "stage_ends": []}))
    (u / "bad.toml").write_text("max_growht = 50\n")
    (u / "notoml.toml").write_text("max_growth = = 5\n")
    (u / "old.png").write_bytes(b"\x89PNG old figure")
    (u / "old.csv").write_text("block,stage,avg_var\n0,0,1.0\n")
    os.chmod(u / "old.png", 0o644)
    os.mkdir(u / "folder.png")
    os.mkfifo(u / "fifo.png")
    os.mkfifo(u / "fifo.json")
    os.mkfifo(u / "fifo.npy")
    return u


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``folder``: its content hash (regular files only: a FIFO is never opened) and its mode."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "-"
        out[str(path.relative_to(folder))] = (digest, st.st_mode)
    return out


# ---- the CLI cases ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    match: str
    env: dict[str, str] = field(default_factory=dict)
    patch: Callable[[Any, Path], None] | None = None


def plot(*extra: str) -> list[str]:
    return [*PLOT, *extra]


def model(spec: str, *extra: str) -> list[str]:
    return ["plot", "-m", spec, *SMALL, "--reference", "none", "-o", "{u}/new.png", *extra]


def saved(spec: str) -> list[str]:
    """A saved model file: no model options (they do not apply to one)."""
    return ["plot", "-m", spec, "--resolution", "32", "--batch-size", "4", "--reference", "none", "-o", "{u}/new.png"]


def _small_records(monkeypatch, u: Path) -> None:
    import spp.files

    monkeypatch.setattr(spp.files, "MAX_RECORD_BYTES", 100)


def _offline(monkeypatch, u: Path) -> None:
    """No network, and empty weight caches: --pretrained must fail at once."""
    import huggingface_hub.constants

    import spp.loading

    monkeypatch.setattr(spp.loading, "_reachable", lambda host, **kw: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(u.parent / "hf-cache"))
    torch.hub.set_dir(str(u.parent / "torch-hub"))


CLI_CASES = [
    # principle 1: values, validated before any work; never a silent clamp
    Case("in_chans_negative", plot("--in-chans", "-3"), 2, "--in-chans must be at least 1, not -3"),
    Case("in_chans_zero", plot("--in-chans", "0"), 2, "--in-chans must be at least 1, not 0"),
    Case("width_nan", plot("--width", "nan"), 2, "--width must be a finite number, not nan"),
    Case("width_inf", plot("--width", "inf"), 2, "--width must be a finite number, not inf"),
    Case("width_huge", plot("--width", "1e6"), 2, "--width of nf_resnet50 must be at most 16"),
    Case("width_zero", plot("--width", "0"), 2, "--width must be positive, not 0.0"),
    Case("width_negative", plot("--width", "-1"), 2, "--width must be positive, not -1.0"),
    Case("width_clamped", plot("--width", "1e-9"), 2, "--width of nf_resnet50 must be at least 0.0625"),
    Case("width_below_4_channels", plot("--width", "0.03"), 2, "--width of nf_resnet50 must be at least 0.0625"),
    Case("seed_beyond_64_bits", plot("--seed", "99999999999999999999999"), 2,
         "--seed must be at most 18446744073709551615"),
    Case("seed_negative", plot("--seed", "-1"), 2, "--seed must be at least 0, not -1"),
    Case("input_std_negative", plot("--input-std", "-1"), 2, "--input-std must be positive, not -1.0"),
    Case("input_std_zero", plot("--input-std", "0"), 2, "--input-std must be positive, not 0.0"),
    Case("input_std_nan", plot("--input-std", "nan"), 2, "--input-std must be a finite number"),
    Case("device_empty", plot("--device", ""), 2, "--device is empty"),
    Case("device_unknown", plot("--device", "tpu9"), 2, "--device 'tpu9' is not a device"),
    Case("channel_dim_too_big", plot("--channel-dim", "7"), 2, "--channel-dim must be at most 5, not 7"),
    Case("channel_dim_too_small", plot("--channel-dim", "-9"), 2, "--channel-dim must be at least -6, not -9"),
    Case("channel_dim_not_in_tensor", plot("--channel-dim", "4"), 2, "channel axis 4 does not exist in a tensor"),
    Case("batch_size_zero", plot("--batch-size", "0"), 2, "--batch-size must be at least 1, not 0"),
    Case("num_samples_zero", plot("--num-samples", "0"), 2, "--num-samples must be at least 1, not 0"),
    Case("resolution_zero", plot("--resolution", "0"), 2, "--resolution must be at least 1, not 0"),
    Case("mode_unknown", plot("--mode", "inference"), 2, "--mode must be train or eval, not 'inference'"),
    Case("dtype_empty", plot("--dtype", ""), 2, "--dtype is empty"),
    Case("alpha_nan", plot("--alpha", "nan"), 2, "--alpha must be a finite number"),
    Case("alpha_negative", plot("--alpha", "-0.5"), 2, "--alpha must be at least 0"),
    Case("activation_unknown", plot("--activation", "relu7"), 2, "unknown activation 'relu7'"),
    Case("kwargs_bool_maybe", plot("--model-kwargs", '{"ws": "maybe"}'), 2,
         "nf_resnet50 option ws must be true or false (or 1/0, yes/no), not 'maybe'"),
    Case("kwargs_duplicate", plot("--model-kwargs", '{"alpha": 0.2, "alpha": 0.3}'), 2,
         "--model-kwargs names 'alpha' twice"),
    Case("kwargs_not_object", plot("--model-kwargs", "[1]"), 2, "--model-kwargs must be a JSON object"),
    Case("kwargs_not_json", plot("--model-kwargs", "{bad"), 2, "--model-kwargs is not valid JSON"),
    Case("kwargs_and_flag", plot("--model-kwargs", '{"width": 0.5}'), 2,
         "--width and --model-kwargs both set 'width'"),
    Case("kwargs_unknown_option", plot("--model-kwargs", '{"depth": 3}'), 2, "nf_resnet50 has no option 'depth'"),
    Case("query_bool_maybe", model("nf_resnet50?ws=maybe"), 2, "option ws must be true or false"),
    Case("query_width_text", model("nf_resnet50?width=abc"), 2, "--width of nf_resnet50 must be a number, not 'abc'"),
    Case("query_alpha_text", model("nf_resnet50?alpha=abc"), 2, "--alpha of nf_resnet50 must be a number, not 'abc'"),
    Case("query_duplicate", model("nf_resnet50?ws=no,ws=yes"), 2, "model option 'ws' is given twice"),
    Case("query_no_value", model("nf_resnet50?ws"), 2, "must read KEY=VALUE[,KEY=VALUE...], not 'ws'"),
    Case("query_empty_value", model("nf_resnet50?ws="), 2, "must read KEY=VALUE[,KEY=VALUE...], not 'ws='"),
    Case("query_bad_key", model("nf_resnet50?1x=2"), 2, "model option '1x' in 'nf_resnet50?1x=2' is not a keyword"),
    Case("query_unknown_option", model("nf_resnet50?bogus=1"), 2, "nf_resnet50 has no option 'bogus'"),
    Case("query_fractional_channels", model("nf_resnet50?in_chans=2.5"), 2,
         "--in-chans of nf_resnet50 must be a whole number, not 2.5"),
    Case("query_heads_zero", ["plot", "-m", "preln_transformer6?heads=0", "-o", "{u}/new.png"], 2,
         "preln_transformer6 option heads must be at least 1, not 0"),
    Case("query_option_of_other_family", model("bn_relu_resnet50?ws=false"), 2,
         "bn_relu_resnet50 has no option 'ws'"),
    Case("typer_seed_text", plot("--seed", "abc"), 2, "Invalid value for '--seed'"),
    Case("typer_width_text", plot("--width", "abc"), 2, "Invalid value for '--width'"),
    Case("typer_batch_fraction", plot("--batch-size", "1.5"), 2, "Invalid value for '--batch-size'"),
    Case("typer_unknown_option", plot("--bogus"), 2, "No such option: --bogus"),
    Case("typer_missing_model", ["plot", "-o", "{u}/new.png"], 2, "Missing option '--model'"),
    Case("typer_unknown_command", ["plott"], 2, "No such command 'plott'"),
    Case("models_no_match", ["models", "zzz*"], 2, "no built-in model matches 'zzz*'"),
    # principle 2: paths are what they must be; no read can hang; claimed sizes checked against the bytes
    Case("input_device", plot("--input", "/dev/zero"), 2, "--input /dev/zero is a device, not a regular file"),
    Case("input_fifo", plot("--input", "{u}/fifo.npy"), 2, "fifo.npy is a pipe, not a regular file"),
    Case("input_missing", plot("--input", "{u}/missing.npy"), 2, "missing.npy does not exist"),
    Case("input_folder_without_images", plot("--input", "{u}/noimg"), 2, "no image files"),
    Case("input_npy_empty", plot("--input", "{u}/empty.npy"), 2, "empty.npy is empty (0 bytes)"),
    Case("input_npy_text", plot("--input", "{u}/text.npy"), 2,
         "not a .npy file (it does not start with the .npy magic bytes)"),
    Case("input_npy_truncated", plot("--input", "{u}/trunc.npy"), 2,
         "its header claims shape (4, 3, 32, 32) of float32 (49152 bytes) but the file holds"),
    Case("input_npy_objects", plot("--input", "{u}/obj.npy"), 2, "holds Python objects (dtype object)"),
    Case("input_npy_bool", plot("--input", "{u}/bool.npy"), 2, "holds booleans (bool), not numbers"),
    Case("input_npy_rank2", plot("--input", "{u}/r2.npy"), 2,
         "nf_resnet50's forward failed on input of shape (batch, 3): RuntimeError"),
    Case("input_npy_int", plot("--input", "{u}/int.npy"), 2, "the input holds int64 values: models of images need"),
    Case("input_npy_uint8", plot("--input", "{u}/u8.npy"), 2, "the input holds uint8 values"),
    Case("input_pt_complex", plot("--input", "{u}/complex.pt"), 2, "holds complex values"),
    Case("input_pt_sparse", plot("--input", "{u}/sparse.pt"), 2, "a sparse_coo tensor; save it dense"),
    Case("input_pt_claims_more_than_it_holds", plot("--input", "{u}/liar.pt"), 2,
         "not a tensor file torch.load reads with weights_only=True"),
    Case("input_pt_text", plot("--input", "{u}/text.pt"), 2, "not a tensor file torch.load reads"),
    Case("checkpoint_folder", plot("--checkpoint", "{u}/sub"), 2, "checkpoint {u}/sub is a folder, not a file"),
    Case("checkpoint_device", plot("--checkpoint", "/dev/zero"), 2, "checkpoint /dev/zero is a device"),
    Case("checkpoint_missing", plot("--checkpoint", "{u}/missing.pt"), 2, "checkpoint {u}/missing.pt does not exist"),
    Case("checkpoint_text", plot("--checkpoint", "{u}/text.pt"), 2, "cannot read checkpoint {u}/text.pt"),
    Case("model_text_as_torchscript", saved("{u}/text.ts"), 2,
         "{u}/text.ts is not a model file spp can read"),
    Case("model_device", saved("/dev/zero"), 2, "model file /dev/zero is a device"),
    Case("model_folder", saved("{u}/sub"), 2, "model file {u}/sub is a folder"),
    Case("model_truncated_pt2", saved("{u}/trunc.pt2"), 2, "cannot load {u}/trunc.pt2 as a torch.export program"),
    Case("model_missing_file", saved("{u}/missing.pt2"), 2, "model file {u}/missing.pt2 does not exist"),
    # principle 3: user code runs guarded: any exception is one line naming the file or model
    Case("factory_unknown", model(f"{FAC}:nosuch"), 2, "has no factory 'nosuch'"),
    Case("factory_value_error", model(f"{FAC}:raises_value"), 2,
         "the factory {u}/fac.py:raises_value failed: ValueError: my factory is broken"),
    Case("factory_type_error_inside", model(f"{FAC}:raises_type_inside"), 2,
         "the factory {u}/fac.py:raises_type_inside failed: TypeError"),
    Case("factory_sys_exit", model(f"{FAC}:exits"), 2, "the factory {u}/fac.py:exits called sys.exit(3)"),
    Case("factory_keyboard_interrupt", model(f"{FAC}:interrupts"), 130,
         "interrupted during the factory {u}/fac.py:interrupts"),
    Case("factory_bad_option", model(f"{FAC}:needs_depth"), 2, "bad option for {u}/fac.py:needs_depth"),
    Case("factory_not_a_module", model(f"{FAC}:not_a_module"), 2, "returned int, not a torch.nn.Module"),
    Case("factory_import_fails", model("{u}/broken_import.py:make"), 2,
         "importing {u}/broken_import.py failed: RuntimeError: cannot import me"),
    Case("factory_file_is_folder", model("{u}/sub/x.py:make"), 2, "model file {u}/sub/x.py does not exist"),
    Case("forward_sys_exit", model(f"{FAC}:fwd_exit"), 2,
         "fwd_exit's forward called sys.exit(4)"),
    Case("forward_raises", model(f"{FAC}:fwd_raise"), 2,
         "fwd_raise's forward failed on input of shape (batch, 3, 32, 32): ValueError: the forward is broken"),
    Case("forward_interrupt", model(f"{FAC}:fwd_interrupt"), 130, "interrupted during fwd_interrupt's forward"),
    Case("discovery_trace_sys_exit", ["blocks", "-m", f"{FAC}:trace_exit"], 2,
         "finding the blocks of trace_exit (tracing its forward) called sys.exit(7)"),
    Case("pretrained_offline", ["plot", "-m", "timm:resnet18", "--pretrained", "--resolution", "32", "-o",
                                "{u}/new.png", "--reference", "none"], 2,
         "huggingface.co cannot be reached (offline?)", patch=_offline),
    # principle 4: outputs checked first, never over an input, a record or a user's own file
    Case("out_unknown_suffix", plot("-o", "{u}/x.gif"), 2, "unknown suffix '.gif'"),
    Case("table_unknown_suffix", plot("--table", "{u}/x.xlsx"), 2, "unknown suffix '.xlsx'"),
    Case("out_missing_folder", plot("-o", "/nonexistent-folder/x.png"), 2,
         "folder '/nonexistent-folder' does not exist"),
    Case("out_is_folder", plot("-o", "{u}/folder.png"), 2, "is a folder"),
    Case("out_is_fifo", plot("-o", "{u}/fifo.png"), 2, "exists and is not a regular file"),
    Case("table_is_record", plot("--table", "{u}/rec.csv"), 2, "is an spp record (its header is rec.csv.meta.json)"),
    Case("default_table_is_record", plot("-o", "{u}/nf.png"), 2,
         "the table next to --out '{u}/nf.csv' is an spp record"),
    Case("default_table_is_users_csv", plot("-o", "{u}/data.png"), 2, "exists and is not a table spp wrote"),
    Case("out_is_an_input_image", plot("--input", "{u}/imgs", "-o", "{u}/imgs/a.png"), 2,
         "is one of this command's inputs"),
    Case("record_over_its_checkpoint", [*RECORD[:-1], "{u}/ck.pt", "--checkpoint", "{u}/ck.pt"], 2,
         "--out '{u}/ck.pt' is one of this command's inputs"),
    Case("record_over_its_factory", ["record", "-m", f"{FAC}:ok", "-o", "{u}/fac.py"], 2, "unknown suffix '.py'"),
    Case("record_unknown_suffix", [*RECORD[:-1], "{u}/x.txt"], 2, "unknown suffix '.txt'"),
    Case("compare_table_is_its_input", ["compare", "{u}/rec.csv", "{u}/a.json", "--table", "{u}/rec.csv"], 2,
         "--table '{u}/rec.csv' is one of this command's inputs"),
    Case("compare_table_is_a_record", ["compare", "{u}/a.json", "{u}/b.json", "--table", "{u}/rec.csv"], 2,
         "is an spp record"),
    Case("compare_one_source", ["compare", "{u}/a.json"], 2, "compare needs at least two records or models"),
    Case("compare_bad_second_model", ["compare", "nf_resnet50", "nf_resnet50?ws=maybe", *SMALL], 2,
         "option ws must be true or false"),
    Case("compare_device_source", ["compare", "{u}/a.json", "/dev/zero"], 2, "/dev/zero is a device"),
    # principle 6: record files parsed bounded and validated, every format
    Case("record_stage_ends_outside", ["compare", "{u}/a.json", "{u}/stage_ends.json"], 2,
         "stage end 1000 is not a row index of its 17 rows"),
    Case("record_stage_ends_unordered", ["compare", "{u}/a.json", "{u}/unordered.json"], 2, "do not increase"),
    Case("record_negative_count", ["compare", "{u}/a.json", "{u}/negcount.json"], 2, "row 3 has count -5 (negative)"),
    Case("record_newer_version", ["compare", "{u}/a.json", "{u}/version99.json"], 2, "written by a newer spp"),
    Case("record_version_zero", ["compare", "{u}/a.json", "{u}/version0.json"], 2, "its format version is 0"),
    Case("record_bad_types", ["compare", "{u}/a.json", "{u}/badtypes.json"], 2, "its column types are"),
    Case("record_deep_nesting", ["compare", "{u}/a.json", "{u}/deep.json"], 2, "nested more than 64 levels deep"),
    Case("record_no_rows", ["compare", "{u}/a.json", "{u}/empty_rows.json"], 2, "it has no rows"),
    Case("record_too_big", ["compare", "{u}/a.json", "{u}/b.json"], 2, "more than the 100 bytes such a file can be",
         patch=_small_records),
    Case("record_fifo", ["compare", "{u}/a.json", "{u}/fifo.json"], 2, "fifo.json is a pipe"),
    # spp check / spp gamma (issue 14): usage errors are exit code 2
    Case("check_nothing_to_check", ["check"], 2, "spp check needs --model or a record file"),
    Case("check_both", ["check", "{u}/a.json", "-m", "nf_resnet50"], 2, "one of them, not both"),
    Case("check_growth_not_a_factor", ["check", "{u}/a.json", "--max-growth", "0.5"], 2,
         "threshold max_growth is a factor and must be above 1"),
    Case("check_threshold_nan", ["check", "{u}/a.json", "--max-mean-ratio", "nan"], 2,
         "threshold max_mean_ratio must be a finite number"),
    Case("check_thresholds_device", ["check", "{u}/a.json", "--thresholds", "/dev/zero"], 2,
         "--thresholds /dev/zero is a device"),
    Case("check_thresholds_unknown_key", ["check", "{u}/a.json", "--thresholds", "{u}/bad.toml"], 2,
         "unknown threshold 'max_growht' (did you mean: max_growth"),
    Case("check_thresholds_not_toml", ["check", "{u}/a.json", "--thresholds", "{u}/notoml.toml"], 2,
         "is not valid TOML"),
    Case("check_json_suffix", ["check", "{u}/a.json", "--json", "{u}/out.txt"], 2, "unknown suffix '.txt'"),
    Case("check_json_over_input", ["check", "{u}/a.json", "--json", "{u}/a.json"], 2,
         "is one of this command's inputs"),
    Case("gamma_unknown", ["gamma", "relu7"], 2, "unknown activation 'relu7'"),
    Case("gamma_code", ["gamma", "__import__('os').system('true')"], 2, "activation"),
    # principle 7: a broken environment, one line at once
    Case("env_rank_without_launcher", plot(), 2, "RANK 1 of WORLD_SIZE 1 (WORLD_SIZE is not set", env={"RANK": "1"}),
    Case("env_world_size_text", plot(), 2, "WORLD_SIZE='two' is not a whole number", env={"WORLD_SIZE": "two"}),
    Case("env_no_master", plot(), 2, "MASTER_ADDR / MASTER_PORT are not set",
         env={"WORLD_SIZE": "2", "RANK": "0"}),
    Case("env_bad_port", plot(), 2, "MASTER_PORT 99999 is not a port",
         env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}),
    Case("env_bad_timeout", plot(), 2, "SPP_DIST_TIMEOUT='soon' must be a positive number of seconds",
         env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
              "SPP_DIST_TIMEOUT": "soon"}),
]


def _fill(text: str, u: Path) -> str:
    return text.replace("{u}", str(u))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_refuses_in_one_line_and_changes_nothing(case, user, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SPP_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.patch is not None:
        case.patch(monkeypatch, user)
    before = snapshot(user)
    result = CliRunner().invoke(app, [_fill(a, user) for a in case.args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert _fill(case.match, user) in lines[0], lines[0]
    assert snapshot(user) == before, "a file of the user's changed, or a file appeared"


# ---- the library API: the same checks, the same one line ---------------------------------------------------------
def _tiny() -> nn.Module:
    return create_model("nf_resnet50", width=0.25)


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

LIBRARY_CASES: list[tuple[str, Callable[[Path], Any], str]] = [
    ("record_list_of_ints", lambda u: spp.record(_tiny(), [1, 2, 3]), "a micro-batch must be a tensor"),
    ("record_string_input", lambda u: spp.record(_tiny(), "x"), "inputs must be a tensor"),
    ("record_model_name", lambda u: spp.record("nf_resnet50", X), "model must be a torch.nn.Module, not str"),
    ("record_mode_unknown", lambda u: spp.record(_tiny(), X, mode="inference"), "mode must be 'train' or 'eval'"),
    ("record_stochastic_text", lambda u: spp.record(_tiny(), X, stochastic="yes"),  # type: ignore[arg-type]
     "stochastic must be True or False, not 'yes'"),
    ("record_channel_dim_bool", lambda u: spp.record(_tiny(), X, channel_dim=True), "channel_dim must be a whole"),
    ("record_channel_dim_range", lambda u: spp.record(_tiny(), X, channel_dim=9), "channel_dim must be at most 5"),
    ("record_on_batch_not_callable", lambda u: spp.record(_tiny(), X, on_batch=5),  # type: ignore[arg-type]
     "on_batch must be a function"),
    ("record_settings_list", lambda u: spp.record(_tiny(), X, settings=[1]),  # type: ignore[arg-type]
     "settings must be a dict with string keys"),
    ("record_taps_ints", lambda u: spp.record(_tiny(), X, taps=[1]),  # type: ignore[list-item]
     "taps must be a list of spp.Tap"),
    ("recorder_residual_tap_int", lambda u: spp.SignalRecorder(_tiny(), residual_tap=3),  # type: ignore[arg-type]
     "residual_tap must be a string"),
    ("load_model_int", lambda u: load_model(123),
     "load_model needs a model spec string"),
    ("load_model_kwargs_list", lambda u: load_model(
        "nf_resnet50", model_kwargs=[1]), "model_kwargs must be a dict"),
    ("load_model_ws_maybe", lambda u: load_model(
        "nf_resnet50", model_kwargs={"ws": "maybe"}), "option ws must be true or false"),
    ("load_record_int", lambda u: spp.load_record(42), "record must be a path (a string), not int 42"),
    ("load_record_fifo", lambda u: spp.load_record(u / "fifo.json"), "fifo.json is a pipe"),
    ("load_record_folder", lambda u: spp.load_record(u / "folder.png"), "unknown suffix '.png'"),
    ("save_record_not_a_record", lambda u: spp.save_record("rows", u / "x.json"), "needs a spp.Record, not str"),
    ("save_record_int_path", lambda u: spp.save_record(spp.load_record(u / "a.json"), 7), "must be a path"),
    ("run_config_seed", lambda u: RunConfig(model="nf_resnet50", seed=-1), "--seed must be at least 0"),
    ("run_config_std_nan", lambda u: RunConfig(model="nf_resnet50", input_std=float("nan")),
     "--input-std must be a finite number"),
    ("run_config_bool_batch", lambda u: RunConfig(model="nf_resnet50", batch_size=True),
     "--batch-size must be a whole number, not True"),
    ("run_config_pretrained_text", lambda u: RunConfig(model="nf_resnet50", pretrained="yes"),  # type: ignore
     "pretrained must be True or False"),
    ("run_config_model_int", lambda u: RunConfig(model=5), "model must be a spec string"),  # type: ignore
    ("gaussian_seed", lambda u: GaussianInput((3, 8, 8), seed=2**64),
     "--seed must be at most 18446744073709551615"),
    ("tensor_file_fifo", lambda u: load_tensor_file(str(u / "fifo.npy")),
     "is a pipe"),
    ("check_bad_threshold", lambda u: spp.check(spp.load_record(u / "a.json"),
                                                 Thresholds(
                                                     max_growth=0.5)), "must be above 1"),
    ("commit_same_target_twice", lambda u: commit_outputs(
        [(u / "x.csv", lambda t: None), (u / "x.csv", lambda t: None)]), "two outputs of one command are the same"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_refuses_in_one_line(call, match, user):
    before = snapshot(user)
    with pytest.raises(SppError) as exc:
        call(user)
    message = str(exc.value)
    assert "\n" not in message and match in message, message
    assert snapshot(user) == before


def test_suite_size():
    """The issue asks for at least 80 cases."""
    assert len(CLI_CASES) + len(LIBRARY_CASES) >= 80


# ---- silently wrong no more: strict booleans, no clamp ------------------------------------------------------------
def _last_sq_mean(*args: str, u: Path) -> float:
    out = u / "r.json"
    result = CliRunner().invoke(app, ["record", *args, *SMALL, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return spp.load_record(out).rows[-1]["avg_sq_mean"]


def test_ws_false_spellings_all_mean_false(user):
    """``?ws=no``, ``?ws="false"``, ``{"ws":"false"}`` and ``--no-ws`` build the same model (same seed, same inputs:
    bit-identical statistics); the default builds Scaled WS, whose squared mean at the last block differs (WS
    removes the channel mean, so it is far smaller there)."""
    no_ws = _last_sq_mean("-m", "nf_resnet50", "--no-ws", u=user)
    for args in (["-m", "nf_resnet50?ws=no"], ["-m", 'nf_resnet50?ws="false"'],
                 ["-m", "nf_resnet50", "--model-kwargs", '{"ws": "false"}'], ["-m", "nf_resnet50?ws=0"]):
        assert _last_sq_mean(*args, u=user) == no_ws, args
    assert _last_sq_mean("-m", "nf_resnet50", u=user) < no_ws


def test_smallest_width_is_four_stem_channels(user):
    """width 4/64 gives the 64-channel stem exactly 4 channels (no floor involved): accepted, and the record's
    stem has 4 channels; anything smaller is refused above (width_below_4_channels)."""
    out = user / "w.json"
    result = CliRunner().invoke(app, ["record", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
                                      "--batch-size", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert spp.load_record(out).rows[0]["channels"] == 4


def test_seed_up_to_64_bits(user):
    """2**64 - 1 is a seed torch takes; the Gaussian micro-batch seed (seed * 1000003 + j) wraps modulo 2**64, so it
    is a valid generator seed, and a different input from seed 0 (a different variance at the stem)."""
    a = _last_sq_mean("-m", "nf_resnet50", "--seed", str(2**64 - 1), u=user)
    b = _last_sq_mean("-m", "nf_resnet50", "--seed", "0", u=user)
    assert a != b


def test_skipped_images_are_counted(user):
    """A folder with two good images and one corrupt file records skipped_images 1 and uses two samples."""
    (user / "imgs" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = user / "img.json"
    result = CliRunner().invoke(app, ["record", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
                                      "--batch-size", "2", "--num-samples", "3", "--input", str(user / "imgs"),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    settings = spp.load_record(out).settings
    assert settings["skipped_images"] == 1
    assert "skipped 1 unreadable image" in result.output


def test_forward_that_updates_a_buffer_leaves_the_model_as_it_was():
    """A forward doing ``self.steps = self.steps + 1`` and ``self.calls += 1``: after ``spp.record`` the state_dict
    is bit-identical and the plain attribute is back at 0 (principle 5)."""

    class Block(nn.Module):
        spp_residual = "conv"

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.register_buffer("steps", torch.zeros(()))
            self.calls = 0

        def forward(self, x):
            self.steps = self.steps + 1
            self.calls += 1
            return x + self.conv(x)

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(), Block())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rec = spp.record(net, torch.randn(2, 3, 8, 8))
    assert rec.num_blocks == 2
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.calls for m in net if isinstance(m, Block)] == [0, 0]


def test_cache_warning_once(tmp_path, monkeypatch):
    """A curve cache that cannot be written is reported once per command, not once per reference."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SPP_CACHE_DIR", str(blocker))
    from spp import cache

    monkeypatch.setattr(cache, "_WARNED", set())
    result = CliRunner().invoke(app, ["plot", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
                                      "--batch-size", "2", "--reference", "bn_relu_resnet,relu_bn_resnet",
                                      "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    # the command's reporter prints each warning as one line (spp.report): exactly one about the cache
    assert result.output.count("could not write the curve cache") == 1, result.output


# ---- principle 4 at the CLI: figure and table committed as a unit, modes kept ------------------------------------
def _plot(u: Path, *extra: str):
    return CliRunner().invoke(app, ["plot", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
                                    "--batch-size", "2", "--reference", "none", "-o", str(u / "w0.png"), *extra])


@pytest.mark.parametrize("failure,code,message", [
    (OSError(28, "No space left on device"), 1, "No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
], ids=["disk_full", "sigint"])
def test_plot_failing_between_figure_and_table_keeps_both_old_files(tmp_path, monkeypatch, failure, code, message):
    """The issue's data loss: the table fails after the figure was written. Both old files stay, byte for byte
    and mode for mode, and no temporary file is left."""
    import spp.commands

    assert _plot(tmp_path).exit_code == 0
    os.chmod(tmp_path / "w0.png", 0o644)
    before = snapshot(tmp_path)

    def table_writer(df, path):
        def write(tmp):
            Path(tmp).write_text("partial")
            raise failure
        return write

    monkeypatch.setattr(spp.commands, "table_writer", table_writer)
    result = _plot(tmp_path, "--seed", "1")
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == code and len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_plot_keeps_modes_and_new_files_follow_the_umask(tmp_path):
    """The issue: every output was written 0600 and an existing 0644 file became 0600."""
    old = os.umask(0o022)
    try:
        assert _plot(tmp_path).exit_code == 0
        assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("w0.png", "w0.csv")} == {0o644}
        os.chmod(tmp_path / "w0.png", 0o664)
        os.chmod(tmp_path / "w0.csv", 0o640)
        assert _plot(tmp_path, "--seed", "1").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w0.png").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "w0.csv").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "spp-cache") == ["w0.csv", "w0.png"]


def test_plot_over_a_record_needs_force(tmp_path):
    """`spp record --out nf.csv` then `spp plot --out nf.png`: refused (the record stays); with --force the table
    replaces it, and its sidecar is rewritten with it: the file loads as the new run's record, never as the new
    numbers under the old run's header."""
    record = CliRunner().invoke(app, ["record", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
                                      "--batch-size", "2", "-o", str(tmp_path / "w0.csv")])
    assert record.exit_code == 0
    kept = (tmp_path / "w0.csv").read_bytes()
    refused = _plot(tmp_path)
    assert refused.exit_code == 2 and "is an spp record" in refused.output
    assert (tmp_path / "w0.csv").read_bytes() == kept and not (tmp_path / "w0.png").exists()
    forced = _plot(tmp_path, "--force", "--seed", "1")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "w0.png").exists() and (tmp_path / "w0.csv").read_bytes() != kept
    assert spp.load_record(tmp_path / "w0.csv").settings["seed"] == 1  # the sidecar is the new run's
    assert pd.read_csv(tmp_path / "w0.csv")["block"].tolist() == list(range(17))


SIGTERM_PLOT = """
import os, signal, sys, time
import spp.commands

def table_writer(df, path):
    def write(tmp):
        open(tmp, "w").write("partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    return write

spp.commands.table_writer = table_writer
sys.argv = ["spp", "plot", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32", "--batch-size", "2",
            "--reference", "none", "--seed", "1", "-o", os.path.join(sys.argv[1], "w0.png")]
from spp.cli import main
main()
"""


def test_sigterm_during_plot_leaves_no_temporary_file(tmp_path):
    """The issue: SIGTERM left a 0-byte .w0.png.*.tmp beside the output. Now the write unwinds, the process ends by
    SIGTERM as it should, and the folder holds exactly the old figure and table."""
    assert _plot(tmp_path).exit_code == 0
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SPP_CACHE_DIR": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-c", SIGTERM_PLOT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == -15, done.stderr[-2000:]
    assert snapshot(tmp_path) == before

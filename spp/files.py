"""Every file spp writes or reads back: output checks, atomic writes, tables, and Record files.

Outputs are checked (suffix, folder, writability) before any work starts and written atomically after it ends: a
temporary file beside the target, renamed over it only when complete.

A Record saves and loads as ``.pt``, ``.json``, ``.parquet`` or ``.csv``, chosen by suffix.

Every format round-trips exactly: floats bit for bit (NaN sign and payload, -0.0, subnormals included), ints,
strings, the stage ends, the settings and the format version.

* ``.pt``: a dict of tensors (float64 / int64 / bool columns), lists of strings, numbers and dicts, written
  with ``torch.save`` and read only with ``torch.load(weights_only=True)``: a record file never runs code.
* ``.json``: one object; the rows are a list of objects. Non-finite floats are the strings ``"NaN"``,
  ``"-NaN"``, ``"Infinity"``, ``"-Infinity"`` (``"NaN(0x<bits>)"`` for an unusual NaN): JSON has no literal.
* ``.parquet``: one column per statistic; stage ends, settings and version in the schema metadata key
  ``spp.record`` (JSON), so pandas / polars / DuckDB read the table as it is.
* ``.csv``: the rows, floats written shortest-exact (``repr``), non-finite as above (pandas reads them as
  NaN/inf); stage ends, settings, version, column types (and the bits of any unusual NaN) in the sidecar
  ``<file>.csv.meta.json``.

Plain tables written by ``spp plot --table`` (CSV, Parquet, JSON) load too, with settings unknown and the
stage ends taken from the ``stage`` column. Settings must be plain data (str, int, float, bool, None, lists,
dicts with str keys); tuples are saved as lists.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from spp.errors import SppError, one_line
from spp.records import Record
from spp.schema import BY_NAME, COLUMNS, FORMAT_VERSION, NAMES, with_defaults

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
TABLE_SUFFIXES = (".csv", ".parquet", ".json")


# ---- outputs: checked before the work, written atomically after it ------------------------------------------
def check_output(path: str, suffixes: Sequence[str], what: str) -> Path:
    """Fail early, before minutes of recording, on an unknown suffix or an unwritable place."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise SppError(f"{what} {path!r}: unknown suffix {p.suffix or '(none)'!r}; use one of {', '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SppError(f"{what} {path!r}: folder {str(parent)!r} does not exist")
    if p.is_dir():
        raise SppError(f"{what} {path!r} is a folder")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SppError(f"{what} {path!r} is not writable")
    return p


def _usual_mode(tmp: str) -> None:
    """Give a temporary file the mode a plain ``open(path, "w")`` would (0666 less the umask): ``mkstemp`` makes
    it 0600, and a figure or table nobody else can read is not what the user asked for."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        yield tmp
        _usual_mode(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_table(df: Any, path: str) -> None:
    """A DataFrame to CSV / Parquet / JSON (records orient) by suffix, atomically."""
    with atomic_path(path) as tmp:
        table_writer(df, path)(tmp)


def table_writer(df: Any, path: str | os.PathLike) -> Callable[[str], None]:
    """A function writing ``df`` to a given file in the format ``path``'s suffix names (CSV / Parquet / JSON)."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise SppError(f"table {str(path)!r}: unknown suffix {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")

    def write(tmp: str) -> None:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", indent=1, double_precision=15)

    return write


def commit_outputs(writers: Mapping[Any, Callable[[str], None]]) -> list[Path]:
    """Write several outputs as a unit (a figure and its table): each writer fills a temporary file beside its
    target, and only when all of them succeeded are the temporary files renamed over the targets. A writer that
    fails leaves every target as it was and no temporary file behind. ``writers``: target path (str or PathLike)
    -> a function that writes the file at the temporary path it is given."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            target = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                       dir=target.parent if str(target.parent) else ".")
            os.close(fd)
            staged.append((tmp, target))
            write(tmp)
            _usual_mode(tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return [target for _, target in staged]

RECORD_SUFFIXES = (".pt", ".json", ".parquet", ".csv")
FORMAT_NAME = "spp-record"
META_KEY = b"spp.record"
_SPECIAL = {"NaN": "7ff8000000000000", "-NaN": "fff8000000000000", "Infinity": "7ff0000000000000",
            "-Infinity": "fff0000000000000"}
_TOKEN_OF_BITS = {bits: token for token, bits in _SPECIAL.items()}


# ---- float tokens: non-finite floats as strings, bit-exact -------------------------------------------------
def float_token(v: float) -> float | str:
    """A finite float as itself; a non-finite one as a string that names its exact bits."""
    if math.isfinite(v):
        return v
    bits = struct.pack(">d", v).hex()
    return _TOKEN_OF_BITS.get(bits, f"NaN(0x{bits})")


def parse_float(token: Any) -> float:
    """Inverse of ``float_token``; also reads ints and ``repr`` strings (CSV cells)."""
    if isinstance(token, float):
        return token
    if isinstance(token, int) and not isinstance(token, bool):
        return float(token)
    if isinstance(token, str):
        m = re.fullmatch(r"NaN\(0x([0-9a-f]{16})\)", token)
        bits = _SPECIAL.get(token) or (m.group(1) if m else None)
        return struct.unpack(">d", bytes.fromhex(bits))[0] if bits else float(token)
    raise ValueError(f"not a float: {token!r}")


# ---- plain data --------------------------------------------------------------------------------------------
def _plain(value: Any, where: str) -> Any:
    """JSON-able plain data: numpy scalars become Python numbers, tuples lists; anything else fails."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):  # subclasses too (torch.__version__ is a str subclass; numpy's float64)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SppError(f"cannot save the record: {where} has a key {k!r} that is not a string")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _plain(value.item(), where)
    raise SppError(f"cannot save the record: {where} is a {type(value).__name__}; records hold plain data "
                   "only (str, int, float, bool, None, lists, dicts)")


def _tag_floats(value: Any) -> Any:
    """For JSON: non-finite floats become {"$float": token}; everything else is JSON already."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": float_token(value)}
    if isinstance(value, list):
        return [_tag_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_floats(v) for k, v in value.items()}
    return value


def _untag_floats(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return parse_float(value["$float"])
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    return {int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


def _columns(rec: Record) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Plain rows, and each column's one type: the schema's for its columns (in its order), then any extra column
    with the one type (float, int, bool or str) its values have."""
    rows = [{k: _plain(v, f"row {i} {k!r}") for k, v in row.items()} for i, row in enumerate(rec.rows)]
    names = list(NAMES)
    for row in rows:
        names += [k for k in row if k not in names]
    types: dict[str, str] = {}
    for col in names:
        missing = [i for i, row in enumerate(rows) if col not in row]
        if missing:
            raise SppError(f"cannot save the record: row {missing[0]} has no {col!r}")
        kinds = {_kind(row[col]) for row in rows}
        if col in BY_NAME:
            want = BY_NAME[col].kind
            if not kinds <= ({want, "int"} if want == "float" else {want}):
                raise SppError(f"cannot save the record: column {col!r} holds {', '.join(sorted(kinds))}, "
                               f"not {want}")
            if want == "float":
                for row in rows:
                    row[col] = float(row[col])
            types[col] = want
            continue
        if len(kinds) > 1 or not kinds <= {"bool", "int", "float", "str"}:
            raise SppError(f"cannot save the record: column {col!r} holds {', '.join(sorted(kinds))}; "
                           "each column must hold one of float, int, bool, str")
        types[col] = kinds.pop() if kinds else "str"
    return rows, types


def _header(rec: Record, types: dict[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": int(rec.version),
        "columns": list(types),
        "types": types,
        "stage_ends": [int(e) for e in rec.stage_ends],
        "settings": _plain(rec.settings, "settings"),
    }


# ---- save --------------------------------------------------------------------------------------------------
def sidecar(path: str | os.PathLike) -> Path:
    """Where a CSV record keeps its header: ``<file>.csv.meta.json``."""
    return Path(f"{path}.meta.json")


def check_record_output(path: str, what: str = "record") -> Path:
    """Fail on a bad suffix or an unwritable place before any recording starts."""
    p = check_output(path, RECORD_SUFFIXES, what)
    if p.suffix.lower() == ".csv":
        check_output(str(sidecar(p)), (".json",), f"{what} sidecar")
    return p


def save_record(rec: Record, path: str | os.PathLike, *, what: str = "record") -> Path:
    """Write ``rec`` to ``path`` atomically, in the format its suffix names (see the module docstring)."""
    p = check_record_output(str(path), what)
    rows, types = _columns(rec)
    header = _header(rec, types)
    suffix = p.suffix.lower()
    if suffix == ".pt":
        _save_pt(rows, p, header)
    elif suffix == ".json":
        cells = [{c: float_token(r[c]) if k == "float" else r[c] for c, k in types.items()} for r in rows]
        doc = {**header, "settings": _tag_floats(header["settings"]), "rows": cells}
        with atomic_path(p) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
    elif suffix == ".parquet":
        _save_parquet(rows, p, header)
    else:
        _save_csv(rows, p, header)
    return p


def _save_pt(rows: list[dict[str, Any]], p: Path, header: dict[str, Any]) -> None:
    import torch

    dtypes = {"float": torch.float64, "int": torch.int64, "bool": torch.bool}
    data = {}
    for col, kind in header["types"].items():
        values = [r[col] for r in rows]
        data[col] = torch.tensor(values, dtype=dtypes[kind]) if kind in dtypes else values
    with atomic_path(p) as tmp:
        torch.save({**header, "data": data}, tmp)


def _save_parquet(rows: list[dict[str, Any]], p: Path, header: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "str": pa.string()}
    arrays = [pa.array([r[c] for r in rows], type=types[k]) for c, k in header["types"].items()]
    meta = json.dumps({**header, "settings": _tag_floats(header["settings"])}, allow_nan=False)
    table = pa.Table.from_arrays(arrays, names=list(header["types"]))
    with atomic_path(p) as tmp:
        pq.write_table(table.replace_schema_metadata({META_KEY: meta}), tmp)


def _cell(v: Any, kind: str) -> str:
    if kind == "float":
        token = repr(v) if math.isfinite(v) else str(float_token(v))
        return token if not token.startswith("NaN(") else "NaN"  # payload kept in the sidecar
    return str(v)


def _save_csv(rows: list[dict[str, Any]], p: Path, header: dict[str, Any]) -> None:
    types = header["types"]
    # Cells stay what pandas reads as numbers; a NaN with an unusual payload keeps its bits in the sidecar.
    payloads = [[i, c, str(float_token(r[c]))] for i, r in enumerate(rows) for c, k in types.items()
                if k == "float" and str(float_token(r[c])).startswith("NaN(")]
    extra = {"nan_payloads": payloads} if payloads else {}
    meta = json.dumps({**header, "settings": _tag_floats(header["settings"]), **extra}, indent=1,
                      allow_nan=False)
    with atomic_path(sidecar(p)) as tmp_meta, atomic_path(p) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(types))
            for r in rows:
                w.writerow([_cell(r[c], k) for c, k in types.items()])
        Path(tmp_meta).write_text(meta + "\n", encoding="utf-8")


# ---- load --------------------------------------------------------------------------------------------------
class NotARecord(SppError):
    """The file was read but holds something else; ``looks_like`` says what, in a few words."""

    def __init__(self, path: str, looks_like: str) -> None:
        super().__init__(f"{path} is not an spp record: it looks like {looks_like}")
        self.looks_like = looks_like


def load_record(path: str | os.PathLike) -> Record:
    """Read a record written by ``save_record`` (or a plain table written by ``spp plot --table``).

    ``.pt`` files are opened only with ``torch.load(weights_only=True)``: a file that would unpickle code
    fails with an SppError and runs nothing.
    """
    p, name = Path(path), str(path)
    if not p.exists():
        raise SppError(f"record {name} does not exist")
    if p.is_dir():
        raise SppError(f"record {name} is a folder, not a file")
    suffix = p.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise SppError(f"record {name}: unknown suffix {suffix or '(none)'!r}; "
                       f"use one of {', '.join(RECORD_SUFFIXES)}")
    loader = {".pt": _load_pt, ".json": _load_json, ".parquet": _load_parquet, ".csv": _load_csv}[suffix]
    try:
        return loader(p, name)
    except SppError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, struct.error) as exc:
        raise SppError(f"record {name} is damaged: {one_line(exc)}") from None




def _check_header(doc: dict[str, Any], name: str) -> None:
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SppError(f"record {name} is damaged: its format version is {version!r}")
    if version > FORMAT_VERSION:
        raise SppError(f"record {name} was written by a newer spp (format {version}, this spp reads up to "
                       f"{FORMAT_VERSION}); upgrade spp")
    types = doc.get("types", {})
    missing = [c.name for c in COLUMNS if c.name not in types and c.default is None]
    if missing:
        raise SppError(f"record {name} is damaged: it lacks the columns {', '.join(missing)}")


def _typed(values: list[Any], kind: str) -> list[Any]:
    if kind == "float":
        return [parse_float(v) for v in values]
    if kind == "int":
        return [int(v) for v in values]
    if kind == "bool":
        return [v if isinstance(v, bool) else {"True": True, "False": False}[v] for v in values]
    return [str(v) for v in values]


def _record(doc: dict[str, Any], columns: dict[str, list[Any]], settings: dict[str, Any]) -> Record:
    names = list(doc["types"])
    lengths = {len(columns[c]) for c in names}
    if len(lengths) > 1:
        raise ValueError("columns of different lengths")
    n = lengths.pop() if lengths else 0
    rows = [with_defaults({c: columns[c][i] for c in names}) for i in range(n)]
    return Record(rows=rows, stage_ends=[int(e) for e in doc["stage_ends"]], settings=settings,
                  version=int(doc["version"]))


def _describe_object(obj: Any) -> str:
    """What an unpickled object looks like, in a few words."""
    import torch

    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        if obj and tensors == len(obj):
            return f"a state_dict with {tensors} tensors"
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return f"a checkpoint with a state_dict of {len(inner)} tensors under {key!r}"
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        return f"a dict with keys {keys}" if obj else "an empty dict"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _load_pt(p: Path, name: str) -> Record:
    import pickle

    import torch

    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                raise NotARecord(name, "a TorchScript archive (a model, not a record)")
    else:
        with open(p, "rb") as f:
            start = f.read(8)
        if not start.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle (protocol 2+)
            raise NotARecord(name, f"no PyTorch file at all (it starts with {start!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickle of Python objects ({found.group(1)})" if found else "a pickle a weights-only load refuses"
        raise NotARecord(name, f"{what}; spp reads .pt files with weights_only=True and never runs pickled "
                               "code") from None
    except Exception as exc:  # torch raises KeyError, RuntimeError, EOFError, ... on files it cannot parse
        raise NotARecord(name, f"no PyTorch file at all ({one_line(exc)})") from None
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_NAME):
        raise NotARecord(name, _describe_object(obj))
    _check_header(obj, name)
    columns = {}
    for col, kind in obj["types"].items():
        values = obj["data"][col]
        columns[col] = _typed(values.tolist() if isinstance(values, torch.Tensor) else list(values), kind)
    return _record(obj, columns, obj.get("settings") or {})


def _load_json(p: Path, name: str) -> Record:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotARecord(name, f"no JSON ({one_line(exc, with_type=False)})") from None
    if isinstance(doc, list):
        return _from_plain_table(doc, name)
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME):
        keys = ", ".join(repr(k) for k in list(doc)[:6]) if isinstance(doc, dict) else ""
        raise NotARecord(name, f"a JSON object with keys {keys}" if keys else f"JSON of {type(doc).__name__}")
    _check_header(doc, name)
    rows = doc["rows"]
    columns = {c: _typed([r[c] for r in rows], k) for c, k in doc["types"].items()}
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}))


def _load_parquet(p: Path, name: str) -> Record:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise NotARecord(name, f"no Parquet file ({one_line(exc, with_type=False)})") from None
    meta = (table.schema.metadata or {}).get(META_KEY)
    if meta is None:
        return _from_plain_table(table.to_pandas(), name)
    doc = json.loads(meta)
    _check_header(doc, name)
    columns = {c: _typed(table.column(c).to_pylist(), k) for c, k in doc["types"].items()}
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}))


def _load_csv(p: Path, name: str) -> Record:
    meta_path = sidecar(p)
    if not meta_path.exists():
        import pandas as pd

        try:
            df = pd.read_csv(p)
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError, ParserError: ValueErrors
            raise NotARecord(name, f"no CSV table ({one_line(exc, with_type=False)})") from None
        return _from_plain_table(df, name)
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = one_line(exc, with_type=False)
        raise SppError(f"record {name}: its sidecar {meta_path} is not JSON ({why})") from None
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME):
        raise SppError(f"record {name}: its sidecar {meta_path} is not an spp record header")
    _check_header(doc, name)
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        head = next(reader, [])
        body = list(reader)
    if head != list(doc["types"]):
        raise SppError(f"record {name} does not match its sidecar {meta_path}: the columns differ")
    columns = {c: _typed([row[i] for row in body], k) for i, (c, k) in enumerate(doc["types"].items())}
    for i, col, token in doc.get("nan_payloads", []):
        columns[col][i] = parse_float(token)
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}))


def _from_plain_table(data: Any, name: str) -> Record:
    """A table from ``spp plot --table``: SPP columns, no settings; stage ends from the ``stage`` column."""
    import pandas as pd

    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    kinds = {".csv": "a CSV", ".json": "a JSON table", ".parquet": "a Parquet table"}
    kind = kinds[Path(name).suffix.lower()]
    needed = ("block", "name", "stage", "avg_sq_mean", "avg_var", "res_avg_var")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        cols = ", ".join(map(str, list(df.columns)[:6])) + (", ..." if len(df.columns) > 6 else "")
        raise NotARecord(name, f"{kind} without the SPP columns ({', '.join(missing)} missing; "
                               f"it has {cols or 'no columns'})")
    fallback = {"float": math.nan, "int": 0, "str": ""}
    label = Path(name).stem
    if "model" in df.columns and "model" not in NAMES and len(df):  # `spp plot --table`: the model, then references
        label = str(df["model"].iloc[0])
        df = df[df["model"] == df["model"].iloc[0]]
    rows = []
    for raw in df.to_dict("records"):
        row: dict[str, Any] = {}
        for c in COLUMNS:
            if c.name in raw:
                v = raw[c.name]
            elif c.default is not None:
                v = c.default(raw) if callable(c.default) else c.default
            else:
                v = fallback[c.kind]
            if c.kind == "float":
                row[c.name] = math.nan if v is None else float(v)
            elif c.kind == "int":
                row[c.name] = int(v)
            else:
                row[c.name] = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        rows.append(row)
    ends = [i for i in range(1, len(rows)) if i + 1 == len(rows) or rows[i + 1]["stage"] != rows[i]["stage"]]
    settings = {"label": label, "loaded_from": "plain table"}
    return Record(rows=rows, stage_ends=ends, settings=settings)

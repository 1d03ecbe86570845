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
import itertools
import json
import math
import os
import re
import secrets
import signal
import struct
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from spp.errors import SppError, one_line
from spp.records import Record
from spp.schema import BY_NAME, COLUMNS, FORMAT_VERSION, NAMES, with_defaults

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
TABLE_SUFFIXES = (".csv", ".parquet", ".json")


# ---- paths the user gives: checked to be what they must be before anything reads them --------------------------
MAX_RECORD_BYTES = 256 * 2**20  # a 600-block record is ~200 kB; anything near this is not a record
MAX_TEXT_BYTES = 2**20  # sidecars, thresholds files: a few kB
MAX_JSON_DEPTH = 64  # records nest settings a few levels deep


def _fspath(path: object, what: str) -> str:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise SppError(f"{what} must be a path (a string), not {type(path).__name__} {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise SppError(f"{what} is empty")
    if "\0" in text:
        raise SppError(f"{what} {text!r} contains a NUL character")
    return text


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def check_input_file(path: object, what: str, *, max_bytes: int | None = None, empty_ok: bool = False) -> Path:
    """``path`` names a readable regular file (not a folder, device, pipe or socket) of plausible size.

    Checked with ``stat`` before anything opens it, so a read of user input cannot hang (``/dev/zero``, a FIFO) or
    exhaust memory; the error says what the path is instead.
    """
    import stat

    text = _fspath(path, what)
    p = Path(os.path.expanduser(text))
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SppError(f"{what} {text} does not exist") from None
    except NotADirectoryError:
        raise SppError(f"{what} {text} does not exist (a part of the path is a file, not a folder)") from None
    except PermissionError:
        raise SppError(f"{what} {text} cannot be read (permission denied)") from None
    except OSError as exc:
        raise SppError(f"{what} {text} cannot be read: {one_line(exc, with_type=False)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SppError(f"{what} {text} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else \
            "a pipe" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file"
        raise SppError(f"{what} {text} is {kind}, not a regular file; spp reads only regular files")
    if st.st_size == 0 and not empty_ok:
        raise SppError(f"{what} {text} is empty (0 bytes)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise SppError(f"{what} {text} is {_megabytes(st.st_size)}, more than the {_megabytes(max_bytes)} such a "
                       "file can be: is it the right file?")
    if not os.access(p, os.R_OK):
        raise SppError(f"{what} {text} cannot be read (permission denied)")
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (hard links and symlinks included); a missing path is compared by name."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


# ---- outputs: checked before the work, committed together after it ---------------------------------------------
def check_output(path: str, suffixes: Sequence[str], what: str, *, inputs: Sequence[str | os.PathLike] = (),
                 replaces: str = "output", force: bool = False) -> Path:
    """Fail early, before minutes of recording, on an unknown suffix, an unwritable place, a target that is not a
    regular file, one of the command's own ``inputs``, or (``replaces="table"``, unless ``force``) an spp record
    or a file that is not an spp table."""
    import stat

    text = _fspath(path, what)
    p = Path(text)
    if p.suffix.lower() not in suffixes:
        raise SppError(f"{what} {path!r}: unknown suffix {p.suffix or '(none)'!r}; use one of {', '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SppError(f"{what} {path!r}: folder {str(parent)!r} does not exist")
    if p.is_dir():
        raise SppError(f"{what} {path!r} is a folder")
    if p.exists() and not stat.S_ISREG(p.stat().st_mode):
        raise SppError(f"{what} {path!r} exists and is not a regular file (a device, pipe or socket); "
                       "spp replaces only regular files")
    for source in inputs:
        if same_file(p, source):
            raise SppError(f"{what} {path!r} is one of this command's inputs ({os.fspath(source)}); "
                           "write it somewhere else")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SppError(f"{what} {path!r} is not writable")
    if replaces == "table" and not force and p.is_file():
        found = _record_evidence(p)
        if found:
            raise SppError(f"{what} {path!r} is an spp record ({found}); a table would overwrite it: choose "
                           "another --table, or pass --force")
        if not _is_spp_table(p):
            raise SppError(f"{what} {path!r} exists and is not a table spp wrote; choose another --table, or "
                           "pass --force to overwrite it")
    return p


def _record_evidence(p: Path) -> str:
    """Why ``p`` is an spp record file ('' when it is not): its sidecar, or the format named in the file."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv" and sidecar(p).is_file():
            return f"its header is {sidecar(p).name}"
        if suffix == ".json":
            with open(p, "rb") as f:
                head = f.read(4096)
            return "its format is spp-record" if FORMAT_NAME.encode() in head else ""
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(p).metadata or {}
            return "its metadata name an spp record" if META_KEY in meta else ""
        if suffix in (".pt", ".pth"):
            return "a PyTorch file"
    except Exception:  # unreadable: not evidence of a record; _is_spp_table decides
        return ""
    return ""


def _is_spp_table(p: Path) -> bool:
    """Whether ``p`` holds a table with spp's columns (what ``spp plot --table`` or ``spp compare --table``
    wrote before), so writing it again replaces spp's own output, not the user's data."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                header = next(csv.reader([f.readline()]), [])
        elif suffix == ".json":
            if p.stat().st_size > MAX_RECORD_BYTES:
                return False
            doc = json.loads(p.read_text(encoding="utf-8"))
            header = list(doc[0]) if isinstance(doc, list) and doc and isinstance(doc[0], dict) else []
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            header = list(pq.read_schema(p).names)
        else:
            return False
    except Exception:
        return False
    names = [str(c) for c in header]
    return "block" in names and "stage" in names and any(c == "avg_var" or c.endswith(":avg_var") for c in names)


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux); else set and put back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: a symlink's target, so the link itself stays the user's link."""
    p = Path(path)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def _stage(target: Path) -> str:
    """A new empty temporary file beside ``target``, named after it (``.NAME.XXXX.tmpSUFFIX``: the suffix kept, so
    writers that pick the format by suffix work), with the mode the target will have: an existing file's own, a
    new file the umask's."""
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=parent)
    try:
        try:
            mode = target.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
    finally:
        os.close(fd)
    return tmp


def _fsync(path: str) -> None:
    """Flush a written file to disk, so a full disk fails here, before anything is replaced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Terminated(BaseException):
    """A signal whose default action ends the process arrived while outputs were being written: unwind (temporary
    files removed), then let it end the process."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_WRITE, _SWAP = "write", "swap"


@contextlib.contextmanager
def _signals(phase: list[str]) -> Iterator[list[int]]:
    """Signals while outputs are committed. Writing (``phase[0] == "write"``): SIGINT and SIGTERM unwind the write
    (the handler that was there runs; one whose default action ends the process raises ``_Terminated``), so no
    temporary file is left. Swapping (``"swap"``): they wait, so the swap is all or nothing. Signals that waited
    are raised again, with the old handlers back, when the block ends. Outside the main thread, where Python
    cannot set handlers, nothing changes."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    wanted = [signal.SIGINT, *([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])]
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in wanted}

    def handler(signum: int, frame: Any) -> None:
        old = previous[signum]
        if phase[0] == _SWAP:
            pending.append(signum)
        elif callable(old):
            old(signum, frame)  # SIGINT: Python's KeyboardInterrupt, or the user's own handler
        elif old == signal.SIG_DFL:
            raise _Terminated(signum)

    installed = []
    for sig in wanted:
        try:
            signal.signal(sig, handler)
            installed.append(sig)
        except (ValueError, OSError):
            continue
    try:
        yield pending
    finally:
        for sig in installed:
            old = previous[sig]
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _raise_again(signals: list[int]) -> None:
    """Deliver signals that waited, now that the old handlers are back (SIGTERM's default ends the process)."""
    for signum in dict.fromkeys(signals):
        signal.raise_signal(signum)


Writer = Callable[[str], None]


def commit_outputs(outputs: Sequence[tuple[str | os.PathLike, Writer]], *,
                   inputs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write a command's outputs as one unit: every one replaces its old file, or none does.

    ``outputs``: (target path, writer) pairs; ``writer(tmp)`` writes the content to the temporary path it is given
    (whose suffix is the target's). All are written first, each to a temporary file beside its target, and flushed
    to disk: a full disk, an exception, SIGINT or SIGTERM there removes every temporary file and leaves every old
    output as it was. Then the temporaries are renamed over the targets with SIGINT and SIGTERM held back; a rename
    that fails puts back every file already replaced. New files get the mode the umask gives, replaced files keep
    theirs, and a symlinked target is written through its link. A target that is one of ``inputs`` is refused.
    """
    targets = [_target(_fspath(path, "output")) for path, _ in outputs]
    for i, t in enumerate(targets):
        if any(same_file(t, other) for other in targets[:i]):
            raise SppError(f"two outputs of one command are the same file: {t}")
        for source in inputs:
            if same_file(t, source):
                raise SppError(f"output {t} is one of this command's inputs ({os.fspath(source)}); nothing written")
    writers = [write for _, write in outputs]
    with _committing(targets) as staged:
        for tmp, write in zip(staged, writers, strict=True):
            write(tmp)
    return targets


@contextlib.contextmanager
def _committing(targets: list[Path]) -> Iterator[list[str]]:
    """Stage a temporary file per target, let the block write them, then swap them in (see ``commit_outputs``)."""
    phase = [_WRITE]
    staged: list[str] = []
    terminated: _Terminated | None = None
    with _signals(phase) as pending:
        try:
            try:
                staged.extend(_stage(t) for t in targets)
                yield staged
                for tmp in staged:
                    _fsync(tmp)
                phase[0] = _SWAP
                _swap(targets, staged)
            except BaseException:
                for tmp in staged:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
        except _Terminated as exc:
            terminated = exc
            pending.append(exc.signum)
    _raise_again(pending)
    if terminated is not None:  # the process lives on: the old handler was not the default one after all
        raise SppError("terminated while writing outputs; every output was left as it was", exit_code=143)


def _backup_name(target: Path) -> str:
    return str(target.parent / f".{target.name}.{secrets.token_hex(6)}.old")


def _swap(targets: list[Path], staged: list[str]) -> None:
    """Rename each staged file over its target, keeping a hard link (or the moved file) of every old target until
    all are in place; on failure put the old files back and remove the new ones."""
    done: list[tuple[Path, str | None]] = []  # (target, backup of the old file, or None when it is new)
    target = targets[0] if targets else Path(".")
    try:
        for target, tmp in zip(targets, staged, strict=True):
            backup = None
            if target.exists():
                backup = _backup_name(target)
                try:
                    os.link(target, backup)
                except OSError:  # no hard links here (FAT, some network shares): move it aside instead
                    os.replace(target, backup)
            done.append((target, backup))
            os.replace(tmp, target)
    except OSError as exc:
        for old_target, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, old_target)
                else:
                    os.unlink(old_target)
            if backup is not None:  # a hard link to a target never replaced: rename() left both names
                with contextlib.suppress(OSError):
                    os.unlink(backup)
        raise SppError(f"could not put {target} in place ({one_line(exc, with_type=False)}); "
                       "every output was left as it was") from None
    for _, backup in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(backup)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (with its suffix); it replaces ``path`` only if the block succeeds.
    One output of ``commit_outputs``: the same modes, signals and clean-up."""
    with _committing([_target(_fspath(path, "output"))]) as staged:
        yield staged[0]


def table_writer(df: Any, path: str | os.PathLike) -> Writer:
    """A writer of ``df`` as CSV / Parquet / JSON (records orient), by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise SppError(f"table {path!r}: unknown suffix {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")

    def write(tmp: str) -> None:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", indent=1, double_precision=15)

    return write


def write_table(df: Any, path: str) -> None:
    """A DataFrame to CSV / Parquet / JSON (records orient) by suffix, atomically."""
    commit_outputs([(path, table_writer(df, path))])


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


def check_record_output(path: str, what: str = "record", *, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Fail on a bad suffix, an unwritable place or one of the command's ``inputs`` before any recording starts."""
    p = check_output(path, RECORD_SUFFIXES, what, inputs=inputs)
    if p.suffix.lower() == ".csv":
        check_output(str(sidecar(p)), (".json",), f"{what} sidecar", inputs=inputs)
    return p


def record_outputs(rec: Record, path: str | os.PathLike) -> list[tuple[Path, Writer]]:
    """The files that make up record ``rec`` saved at ``path`` (a CSV has its sidecar too), each with its writer,
    for ``commit_outputs``: a command that writes a record and other files commits them all as one unit."""
    p = Path(path)
    rows, types = _columns(rec)
    header = _header(rec, types)
    suffix = p.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise SppError(f"record {os.fspath(path)!r}: unknown suffix {suffix or '(none)'!r}; "
                       f"use one of {', '.join(RECORD_SUFFIXES)}")
    if suffix == ".pt":
        return [(p, lambda tmp: _save_pt(rows, tmp, header))]
    if suffix == ".json":
        return [(p, lambda tmp: _save_json(rows, tmp, header))]
    if suffix == ".parquet":
        return [(p, lambda tmp: _save_parquet(rows, tmp, header))]
    return [(sidecar(p), lambda tmp: _save_csv_sidecar(rows, tmp, header)),
            (p, lambda tmp: _save_csv(rows, tmp, header))]


def save_record(rec: Record, path: str | os.PathLike, *, what: str = "record",
                inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``rec`` to ``path`` in the format its suffix names (see the module docstring), as one unit with its
    sidecar (``commit_outputs``): the old file stays until the new one is complete."""
    if not isinstance(rec, Record):
        raise SppError(f"save_record needs a spp.Record, not {type(rec).__name__}")
    p = check_record_output(_fspath(path, what), what, inputs=inputs)
    commit_outputs(record_outputs(rec, p), inputs=inputs)
    return p


def _save_json(rows: list[dict[str, Any]], tmp: str, header: dict[str, Any]) -> None:
    types = header["types"]
    cells = [{c: float_token(r[c]) if k == "float" else r[c] for c, k in types.items()} for r in rows]
    doc = {**header, "settings": _tag_floats(header["settings"]), "rows": cells}
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


def _save_pt(rows: list[dict[str, Any]], tmp: str, header: dict[str, Any]) -> None:
    import torch

    dtypes = {"float": torch.float64, "int": torch.int64, "bool": torch.bool}
    data = {}
    for col, kind in header["types"].items():
        values = [r[col] for r in rows]
        data[col] = torch.tensor(values, dtype=dtypes[kind]) if kind in dtypes else values
    torch.save({**header, "data": data}, tmp)


def _save_parquet(rows: list[dict[str, Any]], tmp: str, header: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "str": pa.string()}
    arrays = [pa.array([r[c] for r in rows], type=types[k]) for c, k in header["types"].items()]
    meta = json.dumps({**header, "settings": _tag_floats(header["settings"])}, allow_nan=False)
    table = pa.Table.from_arrays(arrays, names=list(header["types"]))
    pq.write_table(table.replace_schema_metadata({META_KEY: meta}), tmp)


def _cell(v: Any, kind: str) -> str:
    if kind == "float":
        token = repr(v) if math.isfinite(v) else str(float_token(v))
        return token if not token.startswith("NaN(") else "NaN"  # payload kept in the sidecar
    return str(v)


def _save_csv_sidecar(rows: list[dict[str, Any]], tmp: str, header: dict[str, Any]) -> None:
    types = header["types"]
    # Cells stay what pandas reads as numbers; a NaN with an unusual payload keeps its bits in the sidecar.
    payloads = [[i, c, str(float_token(r[c]))] for i, r in enumerate(rows) for c, k in types.items()
                if k == "float" and str(float_token(r[c])).startswith("NaN(")]
    extra = {"nan_payloads": payloads} if payloads else {}
    meta = json.dumps({**header, "settings": _tag_floats(header["settings"]), **extra}, indent=1,
                      allow_nan=False)
    Path(tmp).write_text(meta + "\n", encoding="utf-8")


def _save_csv(rows: list[dict[str, Any]], tmp: str, header: dict[str, Any]) -> None:
    types = header["types"]
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(types))
        for r in rows:
            w.writerow([_cell(r[c], k) for c, k in types.items()])


# ---- load --------------------------------------------------------------------------------------------------
class NotARecord(SppError):
    """The file was read but holds something else; ``looks_like`` says what, in a few words."""

    def __init__(self, path: str, looks_like: str) -> None:
        super().__init__(f"{path} is not an spp record: it looks like {looks_like}")
        self.looks_like = looks_like


def load_record(path: str | os.PathLike) -> Record:
    """Read a record written by ``save_record`` (or a plain table written by ``spp plot --table``).

    ``.pt`` files are opened only with ``torch.load(weights_only=True)``: a file that would unpickle code
    fails with an SppError and runs nothing. Parsing is bounded (``MAX_RECORD_BYTES``, ``MAX_JSON_DEPTH``) and every
    field spp uses is checked (``_check_record``): a damaged or hand-edited file is refused in one line, never
    drawn wrong.
    """
    name = _fspath(path, "record")
    suffix = Path(name).suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise SppError(f"record {name}: unknown suffix {suffix or '(none)'!r}; "
                       f"use one of {', '.join(RECORD_SUFFIXES)}")
    p = check_input_file(name, "record", max_bytes=MAX_RECORD_BYTES)
    loader = {".pt": _load_pt, ".json": _load_json, ".parquet": _load_parquet, ".csv": _load_csv}[suffix]
    try:
        return loader(p, name)
    except SppError:
        raise
    except RecursionError:
        raise SppError(f"record {name} is damaged: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, struct.error) as exc:
        raise SppError(f"record {name} is damaged: {one_line(exc)}") from None


def _check_header(doc: dict[str, Any], name: str) -> None:
    """The header fields every format shares: a known version, column types, stage ends, plain settings."""
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SppError(f"record {name} is damaged: its format version is {version!r}")
    if version > FORMAT_VERSION:
        raise SppError(f"record {name} was written by a newer spp (format {version}, this spp reads up to "
                       f"{FORMAT_VERSION}); upgrade spp")
    types = doc.get("types")
    if not isinstance(types, dict) or any(not isinstance(c, str) or k not in _KINDS for c, k in types.items()):
        raise SppError(f"record {name} is damaged: its column types are {_short(types)}")
    wrong = [c for c, k in types.items() if c in BY_NAME and k != BY_NAME[c].kind]
    if wrong:
        raise SppError(f"record {name} is damaged: column {wrong[0]!r} is {types[wrong[0]]}, not "
                       f"{BY_NAME[wrong[0]].kind}")
    missing = [c.name for c in COLUMNS if c.name not in types and c.default is None]
    if missing:
        raise SppError(f"record {name} is damaged: it lacks the columns {', '.join(missing)}")
    ends = doc.get("stage_ends")
    if not isinstance(ends, list) or any(isinstance(e, bool) or not isinstance(e, int) for e in ends):
        raise SppError(f"record {name} is damaged: its stage ends are {_short(ends)}, not a list of row indices")
    settings = doc.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise SppError(f"record {name} is damaged: its settings are a {type(settings).__name__}, not an object")
    _check_plain(settings or {}, name)


_KINDS = ("float", "int", "bool", "str")
MAX_ROWS = 1_000_000
# Columns that count something: never negative. (Statistics are kept as written, bit for bit, NaN and -inf too.)
_COUNTS = ("block", "layer", "stage", "channels", "count", "nonfinite")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_plain(value: Any, name: str) -> None:
    """Settings are plain data (str, int, float, bool, None, lists, dicts with str keys), at most
    ``MAX_JSON_DEPTH`` levels deep; checked without recursion, so a hostile file cannot exhaust the stack."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise SppError(f"record {name} is damaged: its settings nest more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            if any(not isinstance(k, str) for k in item):
                raise SppError(f"record {name} is damaged: its settings have a key that is not a string")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise SppError(f"record {name} is damaged: its settings hold a {type(item).__name__}, not plain data")


def _whole(v: Any) -> int:
    """An int cell: an int, an integral float (pandas reads int columns with gaps as floats) or a decimal string."""
    if isinstance(v, bool):
        raise ValueError(f"not a whole number: {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"not a whole number: {v!r}")
        return int(v)
    if isinstance(v, str):
        return int(v.strip(), 10)
    if type(v).__module__ == "numpy" and hasattr(v, "item"):
        return _whole(v.item())
    raise ValueError(f"not a whole number: {v!r}")


def _typed(values: list[Any], kind: str) -> list[Any]:
    if kind == "float":
        return [parse_float(v) for v in values]
    if kind == "int":
        return [_whole(v) for v in values]
    if kind == "bool":
        return [v if isinstance(v, bool) else {"True": True, "False": False}[v] for v in values]
    return [v if isinstance(v, str) else str(v) for v in values]


def _check_record(rows: list[dict[str, Any]], ends: list[int], name: str) -> None:
    """The fields spp indexes and counts with, so a damaged file is refused here instead of drawn wrong or crashing
    later: at least the stem row, block indices increasing, counts not negative, and stage ends that are increasing
    row indices ending at the last row."""
    n = len(rows)
    if n == 0:
        raise SppError(f"record {name} is damaged: it has no rows (not even the stem)")
    if n > MAX_ROWS:
        raise SppError(f"record {name} has {n} rows, more than the {MAX_ROWS} a record can have")
    for i, row in enumerate(rows):
        for col in _COUNTS:
            if col in row and row[col] < 0:
                raise SppError(f"record {name} is damaged: row {i} has {col} {row[col]} (negative)")
        if i and row["block"] <= rows[i - 1]["block"]:
            raise SppError(f"record {name} is damaged: block indices do not increase at row {i} "
                           f"({rows[i - 1]['block']} then {row['block']})")
    bad = [e for e in ends if not 1 <= e <= n - 1]
    if bad:
        raise SppError(f"record {name} is damaged: stage end {bad[0]} is not a row index of its {n} rows "
                       f"(1 to {n - 1})")
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise SppError(f"record {name} is damaged: its stage ends {_short(ends)} do not increase")
    if n > 1 and (not ends or ends[-1] != n - 1):
        raise SppError(f"record {name} is damaged: its last stage ends at row {ends[-1] if ends else None}, not at "
                       f"its last row {n - 1}")


def _record(doc: dict[str, Any], columns: dict[str, list[Any]], settings: dict[str, Any], name: str) -> Record:
    names = list(doc["types"])
    lengths = {len(columns[c]) for c in names}
    if len(lengths) > 1:
        raise SppError(f"record {name} is damaged: its columns have different lengths ({sorted(lengths)})")
    n = lengths.pop() if lengths else 0
    rows = [with_defaults({c: columns[c][i] for c in names}) for i in range(n)]
    ends = list(doc["stage_ends"])
    _check_record(rows, ends, name)
    return Record(rows=rows, stage_ends=ends, settings=settings, version=int(doc["version"]))


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
    data = obj.get("data")
    if not isinstance(data, dict):
        raise SppError(f"record {name} is damaged: it has no data columns")
    columns = {}
    for col, kind in obj["types"].items():
        values = data[col]
        if isinstance(values, torch.Tensor):
            if values.ndim != 1 or values.layout != torch.strided or values.is_complex():
                raise SppError(f"record {name} is damaged: column {col!r} is a tensor of shape "
                               f"{tuple(values.shape)}, not a plain column")
            values = values.tolist()
        elif not isinstance(values, list):
            raise SppError(f"record {name} is damaged: column {col!r} is a {type(values).__name__}, not a column")
        columns[col] = _typed(values, kind)
    return _record(obj, columns, obj.get("settings") or {}, name)


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
    rows = doc.get("rows")
    if not isinstance(rows, list) or any(not isinstance(r, dict) for r in rows):
        raise SppError(f"record {name} is damaged: its rows are not a list of objects")
    columns = {c: _typed([r[c] for r in rows], k) for c, k in doc["types"].items()}
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}), name)


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
    try:
        doc = json.loads(meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SppError(f"record {name} is damaged: its metadata are not JSON ({one_line(exc, with_type=False)})"
                       ) from None
    if not isinstance(doc, dict):
        raise SppError(f"record {name} is damaged: its metadata are not an spp record header")
    _check_header(doc, name)
    columns = {c: _typed(table.column(c).to_pylist(), k) for c, k in doc["types"].items()}
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}), name)


def _load_csv(p: Path, name: str) -> Record:
    meta_path = sidecar(p)
    if not meta_path.exists():
        import pandas as pd

        try:
            df = pd.read_csv(p)
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError, ParserError: ValueErrors
            raise NotARecord(name, f"no CSV table ({one_line(exc, with_type=False)})") from None
        return _from_plain_table(df, name)
    check_input_file(meta_path, f"record {name}: its sidecar", max_bytes=MAX_RECORD_BYTES)
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
    if any(len(row) != len(head) for row in body):
        raise SppError(f"record {name} is damaged: a row does not have its {len(head)} cells")
    columns = {c: _typed([row[i] for row in body], k) for i, (c, k) in enumerate(doc["types"].items())}
    payloads = doc.get("nan_payloads", [])
    if not isinstance(payloads, list):
        raise SppError(f"record {name} is damaged: its NaN payloads are not a list")
    for item in payloads:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and
                0 <= item[0] < len(body) and doc["types"].get(item[1]) == "float"):
            raise SppError(f"record {name} is damaged: NaN payload {_short(item)} names no float cell")
        i, col, token = item
        columns[col][i] = parse_float(token)
    return _record(doc, columns, _untag_floats(doc.get("settings") or {}), name)


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
                row[c.name] = _whole(v)
            else:
                row[c.name] = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        rows.append(row)
    ends = [i for i in range(1, len(rows)) if i + 1 == len(rows) or rows[i + 1]["stage"] != rows[i]["stage"]]
    _check_record(rows, ends, name)
    settings = {"label": label, "loaded_from": "plain table"}
    return Record(rows=rows, stage_ends=ends, settings=settings)

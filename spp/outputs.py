"""Output files: check suffix and writability before the work starts, write atomically after it ends."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from spp.errors import SppError


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


TABLE_SUFFIXES = (".csv", ".parquet", ".json")


def write_table(df, path: str) -> None:
    """A DataFrame to CSV / Parquet / JSON (records orient) by suffix, atomically."""
    suffix = Path(path).suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix == ".json":
            df.to_json(tmp, orient="records", indent=1, double_precision=15)
        else:
            raise SppError(f"table {path!r}: unknown suffix {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")

"""On-disk cache of recorded curves of built-in models (the references drawn behind a user's model).

A reference SPP is a pure function of its run: the model name and options, the input settings, seed, mode,
device and dtype, and the code that builds and measures it. ``run_key`` hashes all of that (the RunConfig, the
spp version, a fingerprint of spp's own source files, torch's version, and for file inputs the files' sizes and
modification times) so a cached curve is only ever reused for the same computation; plotting one model beside
three 600-layer references then costs about one model's forward.

Entries are JSON record files (``spp.files``: floats bit-exact, never unpickled) under
``platformdirs.user_cache_dir("spp")/records``, or ``$SPP_CACHE_DIR/records``. An entry that cannot be read, or
whose stored key differs, is ignored and rewritten. Writes are atomic; a cache that cannot be written is skipped
with a warning, never an error. ``--no-cache`` (``use_cache=False``) neither reads nor writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from spp.errors import SppError
from spp.records import Record

ENV = "SPP_CACHE_DIR"
KEY_VERSION = 1
MAX_ENTRIES = 256  # beyond this many files the oldest go (an entry is ~10 kB per 100 blocks)
_WARNED: set[str] = set()  # cache folders already reported unwritable in this process


def cache_dir() -> Path:
    """``$SPP_CACHE_DIR`` if set, else the user cache folder for spp (``~/.cache/spp`` on Linux)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("spp"))


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over spp's own .py files: a development checkout's edits invalidate what they may have changed."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _input_fingerprint(spec: str | None) -> Any:
    """None for generated inputs (Gaussian, tokens, embeddings: the run's settings say all of them); for files,
    every file's (path, size, mtime): an edited file is a new input."""
    from spp.inputs import input_files

    files = input_files(spec)
    if not files:
        return None
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def run_key(cfg) -> str | None:
    """The cache key of recording ``cfg`` (a RunConfig), or None when the run is not cacheable: only built-in
    models, randomly initialised (no checkpoint, not pretrained), are."""
    import torch

    from spp import __version__
    from spp.loading import split_options
    from spp.models import is_model

    base, _ = split_options(cfg.model)
    if not is_model(base) or cfg.checkpoint or cfg.pretrained:
        return None
    try:
        inputs = _input_fingerprint(cfg.input)
    except (OSError, SppError):
        return None  # the recording will say what is wrong with the input
    doc = {
        "key_version": KEY_VERSION,
        "run": cfg.describe(),
        "inputs": inputs,
        "spp": __version__,
        "code": code_fingerprint(),
        "torch": torch.__version__,
    }
    text = json.dumps(doc, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(cfg, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.model)[:80]
    return cache_dir() / "records" / f"{safe}-{key[:32]}.json"


def load(cfg, key: str) -> Record | None:
    """The cached Record of ``cfg`` if there is a sound one; None otherwise (missing, damaged, another key)."""
    from spp.files import load_record

    path = entry_path(cfg, key)
    if not path.is_file():
        return None
    try:
        rec = load_record(path)
    except (SppError, OSError, ValueError):
        return None
    if rec.settings.get("cache_key") != key:
        return None
    return rec


def store(cfg, key: str, rec: Record) -> Path | None:
    """Write ``rec`` as the entry of ``cfg``; on any failure warn once and go on (the cache is an optimisation)."""
    from spp.files import save_record

    path = entry_path(cfg, key)
    stored = Record(rows=rec.rows, stage_ends=rec.stage_ends, settings={**rec.settings, "cache_key": key},
                    version=rec.version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_record(stored, path, what="cache entry")
    except (SppError, OSError, ValueError, TypeError) as exc:
        if str(path.parent) not in _WARNED:  # once per folder and process, not once per reference
            _WARNED.add(str(path.parent))
            warnings.warn(f"could not write the curve cache at {path.parent} ({exc}); set {ENV} to a writable "
                          "folder or pass --no-cache", stacklevel=2)
        return None
    _prune(path.parent)
    return path


def _prune(folder: Path, keep: int = MAX_ENTRIES) -> None:
    """Delete the least recently written entries beyond ``keep`` (stale keys of older code pile up otherwise)."""
    try:
        files = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
    except OSError:
        return
    for f in files[keep:]:
        with contextlib.suppress(OSError):
            f.unlink()


def cached_record(cfg, compute: Callable[[], Record], *, use_cache: bool = True) -> Record:
    """``compute()``'s Record for ``cfg``, read from the cache when an entry for exactly this run exists.

    Under torchrun, rank 0 alone reads and writes the cache and tells the others whether to record: every rank
    records (its shard) or none does, and every rank gets the same Record. The caller starts the process group
    first (``spp.run.record_cached``): a cache lookup never does.
    """
    from spp import distributed

    key = run_key(cfg) if use_cache else None
    if key is None:
        return compute()
    ctx = distributed.current()
    if distributed.env_context().active and not ctx.active:
        raise RuntimeError("cached_record under torchrun needs the process group started first")
    hit = load(cfg, key) if ctx.is_main else None
    hit = distributed.broadcast_object(hit)
    if hit is not None:
        hit.settings.pop("cache_key", None)
        hit.settings["cached"] = True
        return hit
    rec = compute()
    if ctx.is_main:
        store(cfg, key, rec)
    return rec


def clear() -> int:
    """Delete every cache entry; returns how many files were removed."""
    folder = cache_dir() / "records"
    removed = 0
    if folder.is_dir():
        for f in folder.glob("*.json"):
            try:
                f.unlink()
                removed += 1
            except OSError:
                continue
    return removed

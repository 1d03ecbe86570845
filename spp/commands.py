"""The library behind each CLI command, one function per command and of the same name.

The CLI parses and prints; these do the work and return data, so a notebook gets exactly what the CLI draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spp.outputs import TABLE_SUFFIXES, check_output, write_table
from spp.record import Record
from spp.run import Progress, RunConfig, record_model


@dataclass
class PlotResult:
    record: Record
    references: list[Record]
    figure: Path
    table: Path
    warnings: list[str] = field(default_factory=list)  # NaN/Inf in the activations: the CLI exits non-zero
    notes: list[str] = field(default_factory=list)  # worth knowing (skipped images, zero branches)


def default_table_path(out: str) -> str:
    return str(Path(out).with_suffix(".csv"))


def plot(
    cfg: RunConfig,
    *,
    out: str = "spp.png",
    table: str | None = None,
    reference: str | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> PlotResult:
    """Record ``cfg.model`` and its references; draw the SPP to ``out``, the numbers to ``table``."""
    from spp import render
    from spp.references import is_same_run, record_reference, reference_config, reference_names

    table = table or default_table_path(out)
    check_output(out, render.FIGURE_SUFFIXES, "--out")
    check_output(table, TABLE_SUFFIXES, "--table")
    rec = record_model(cfg, progress=progress)
    refs = []
    for name in reference_names(reference, rec.num_blocks):
        if is_same_run(cfg, reference_config(cfg, name)):
            continue  # the model is itself this reference: drawing it twice would hide nothing but cost a forward
        refs.append(record_reference(cfg, name, progress=progress, use_cache=use_cache))
    if _writes():  # under torchrun every rank records its shard; rank 0 alone writes
        fig = render.plot(rec, references=refs, title=_title(rec))
        render.save_figure(fig, out)
        write_table(rec.to_frame(), table)
    return PlotResult(rec, refs, Path(out), Path(table), warnings=nonfinite_warnings(rec), notes=run_notes(rec))


def _writes() -> bool:
    """True unless this is a torchrun rank other than 0 (``spp.distributed``): only rank 0 writes files."""
    from spp.distributed import is_main_process

    return is_main_process()


def _title(rec: Record) -> str:
    s = rec.settings
    shape = s.get("input_shape")
    shape_text = "x".join(str(v) for v in shape) if shape else "?"
    return (f"SPP of {rec.label} — {s.get('input', 'gaussian')} input {shape_text}, {s.get('num_samples')} "
            f"samples in micro-batches of {s.get('batch_size')}, {s.get('mode')} mode, seed {s.get('seed')}")


def nonfinite_warnings(rec: Record, label: str | None = None) -> list[str]:
    bad = [r for r in rec.rows if r["nonfinite"]]
    if not bad:
        return []
    first = bad[0]
    return [f"NaN/Inf in {len(bad)} of {len(rec.rows)} tap points of {label or rec.label}, first at block "
            f"{first['block']} ({first['name']}): see the 'nonfinite' column"]


def run_notes(rec: Record) -> list[str]:
    """What a user should know before reading the curves: skipped inputs, branches that are zero at init."""
    notes = []
    skipped = rec.settings.get("skipped_images")
    if skipped:
        notes.append(f"skipped {skipped} unreadable image(s)")
    zero = [r for r in rec.rows if r["note"]]
    if zero:
        notes.append(f"{len(zero)} block(s) of {rec.label} carry a note, e.g. {zero[0]['name']}: {zero[0]['note']}")
    return notes


def blocks(cfg: RunConfig):
    """The taps spp would record for ``cfg.model``: stage, name, output site, residual site, rule."""
    from spp.discovery import find_taps
    from spp.loading import load_model

    loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                        checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    return find_taps(loaded.model, blocks=list(cfg.blocks) or None, residual_tap=cfg.residual_tap,
                     channel_dim=cfg.channel_dim)


def models(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, description) of every built-in reference model."""
    from spp.models import get_entry, list_models

    return [(n, get_entry(n).description) for n in list_models(pattern)]


# ---- record / compare --------------------------------------------------------------------------------------
@dataclass
class RecordResult:
    record: Record
    path: Path
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def record(cfg: RunConfig, *, out: str, progress: Progress | None = None) -> RecordResult:
    """Record ``cfg.model`` and save the Record to ``out`` (``.pt``, ``.json``, ``.parquet``, ``.csv``)."""
    from spp.io import check_record_output, save_record

    check_record_output(out, "--out")
    rec = record_model(cfg, progress=progress)
    path = save_record(rec, out, what="--out") if _writes() else Path(out)
    return RecordResult(rec, path, nonfinite_warnings(rec), run_notes(rec))


@dataclass
class CompareResult:
    comparison: Any  # spp.compare.Comparison: .table, .divergence, .stages, .labels, .records
    x: str
    x_note: str
    figure: Path | None = None
    table: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _source(source: str | Record, cfg: RunConfig | None, progress: Progress,
            use_cache: bool = True) -> tuple[Record, str]:
    """A record and its default label from a Record, a record file, or a model spec (recorded now, or read from
    the curve cache for a built-in model: ``spp.cache``)."""
    from spp.errors import SppError
    from spp.io import RECORD_SUFFIXES, NotARecord, load_record

    if isinstance(source, Record):
        return source, source.label
    path = Path(source)
    model_cfg = replace(cfg or RunConfig(model=source), model=source, label=None)
    if path.is_file() or (path.suffix.lower() in RECORD_SUFFIXES and not path.exists()):
        try:
            return load_record(path), path.stem
        except NotARecord as not_record:
            if path.suffix.lower() not in (".pt", ".pth"):
                raise
            try:  # a model file, perhaps: whatever --model accepts is a model spec
                with warnings.catch_warnings():  # torch's note on foreign pickles is noise next to our error
                    warnings.filterwarnings("ignore", message="Detected pickle protocol")
                    return record_model(model_cfg, progress=progress), path.stem
            except SppError as exc:
                raise SppError(f"{source} is not an spp record (it looks like {not_record.looks_like}) nor a "
                               f"model spp can load ({exc})") from None
    from spp.cache import cached_record

    rec = cached_record(model_cfg, lambda: record_model(model_cfg, progress=progress), use_cache=use_cache)
    return rec, rec.label


def compare(
    sources: Sequence[str | Record],
    cfg: RunConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    out: str | None = None,
    table: str | None = None,
    x: str | None = None,
    align: str = "auto",
    progress: Progress | None = None,
    use_cache: bool = True,
) -> CompareResult:
    """Compare record files, Records and model specs (recorded with ``cfg``'s model and input settings).

    Outputs are checked first, files loaded next, models recorded last, so a typo fails in a blink.
    ``x=None``: block index when block counts are equal, relative depth otherwise. ``spp.compare`` explains
    the alignment.
    """
    from spp import compare as comparing
    from spp.errors import SppError

    sources = list(sources)
    if len(sources) < 2:
        raise SppError("compare needs at least two records or models, e.g. spp compare a.pt b.pt")
    labels = list(labels or [])
    if len(labels) > len(sources):
        raise SppError(f"{len(labels)} --label values for {len(sources)} records or models")
    if x not in (None, "block", "relative"):
        raise SppError(f"--x must be block or relative, not {x!r}")
    if align not in ("auto", "name", "relative"):
        raise SppError(f"--align must be auto, name or relative, not {align!r}")
    if out is not None:
        from spp.render import FIGURE_SUFFIXES

        check_output(out, FIGURE_SUFFIXES, "--out")
    if table is not None:
        check_output(table, TABLE_SUFFIXES, "--table")

    tables = (".json", ".csv", ".parquet")
    is_file = [isinstance(s, Record) or Path(s).is_file() or Path(s).suffix.lower() in tables
               for s in sources]
    resolved: dict[int, tuple[Record, str]] = {}
    for order in (True, False):  # files first: a bad file fails before minutes of recording
        for i, s in enumerate(sources):
            if is_file[i] == order:
                resolved[i] = _source(s, cfg, progress, use_cache)
    records = [resolved[i][0] for i in range(len(sources))]
    labels = labels + [resolved[i][1] for i in range(len(labels), len(sources))]

    comparison = comparing.compare_records(records, labels, align=align)  # type: ignore[arg-type]
    auto_x, x_note = comparing.default_x(records)
    if x is not None and x != auto_x:
        x_note = f"x axis: {'block index' if x == 'block' else 'relative depth'} (--x {x})"
    x = x or auto_x
    warnings = list(comparison.warnings)
    for rec, lab in zip(records, comparison.labels, strict=True):
        warnings += nonfinite_warnings(rec, lab)

    figure = None
    if out is not None:
        from spp import render

        fig = render.plot(records, x=x, labels=comparison.labels,  # type: ignore[arg-type]
                          title="SPP comparison: " + " vs ".join(comparison.labels))
        if _writes():
            render.save_figure(fig, out)
        figure = Path(out)
    if table is not None and _writes():
        write_table(comparison.table, table)
    return CompareResult(comparison, x, x_note, figure, Path(table) if table else None, warnings)

"""The library behind each CLI command: the CLI parses and prints, these do the work and return data, so a notebook
gets exactly what the CLI draws.

``plot_model`` (``spp plot``), ``record_to_file`` (``spp record``), ``compare_sources`` (``spp compare``),
``list_blocks`` (``spp blocks``), ``list_models`` (``spp models``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spp.files import FIGURE_SUFFIXES, TABLE_SUFFIXES, check_output, write_table
from spp.records import Record
from spp.run import Progress, RunConfig, record_cached, record_run
from spp.taps import Tap


@dataclass
class PlotResult:
    record: Record
    references: list[Record]
    figure: Path
    table: Path
    nonfinite: list[str] = field(default_factory=list)  # NaN/Inf in the activations: the CLI exits with code 3
    notes: list[str] = field(default_factory=list)  # worth knowing (skipped images, zero branches)


def default_table_path(out: str) -> str:
    return str(Path(out).with_suffix(".csv"))


def plot_model(
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
    check_output(out, FIGURE_SUFFIXES, "--out")
    check_output(table, TABLE_SUFFIXES, "--table")
    rec = record_run(cfg, progress=progress)
    refs = []
    for name in reference_names(reference, rec.num_blocks):
        if is_same_run(cfg, reference_config(cfg, name)):
            continue  # the model is itself this reference: drawing it twice would hide nothing but cost a forward
        refs.append(record_reference(cfg, name, progress=progress, use_cache=use_cache))
    if _writes():  # under torchrun every rank records its shard; rank 0 alone writes
        fig = render.draw(rec, references=refs, title=_title(rec))
        render.save_figure(fig, out)
        write_table(rec.to_frame(), table)
    return PlotResult(rec, refs, Path(out), Path(table), nonfinite=nonfinite_messages(rec), notes=run_notes(rec))


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


def nonfinite_messages(rec: Record, label: str | None = None) -> list[str]:
    """One message when some tap's statistics are NaN or infinite (the CLI then exits with code 3)."""
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
    noted = [r for r in rec.rows if r["note"]]
    if noted:
        notes.append(f"{len(noted)} block(s) of {rec.label} carry a note, e.g. {noted[0]['name']}: "
                     f"{noted[0]['note']}")
    return notes


def list_blocks(cfg: RunConfig) -> list[Tap]:
    """The taps spp would record for ``cfg.model``: stage, name, output site, residual site, rule."""
    from spp.discovery import find_taps
    from spp.loading import load_model

    loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                        checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    return find_taps(loaded.model, blocks=list(cfg.blocks) or None, residual_tap=cfg.residual_tap)


def list_models(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, description) of every built-in reference model."""
    from spp.models import get_entry, list_models

    return [(n, get_entry(n).description) for n in list_models(pattern)]


# ---- record / compare --------------------------------------------------------------------------------------
@dataclass
class RecordResult:
    record: Record
    path: Path
    nonfinite: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def record_to_file(cfg: RunConfig, *, out: str, progress: Progress | None = None) -> RecordResult:
    """Record ``cfg.model`` and save the Record to ``out`` (``.pt``, ``.json``, ``.parquet``, ``.csv``)."""
    from spp.files import check_record_output, save_record

    check_record_output(out, "--out")
    rec = record_run(cfg, progress=progress)
    path = save_record(rec, out, what="--out") if _writes() else Path(out)
    return RecordResult(rec, path, nonfinite_messages(rec), run_notes(rec))


@dataclass
class CompareResult:
    comparison: Any  # spp.comparison.Comparison: .table, .divergence, .stages, .labels, .records
    x: str
    x_note: str
    figure: Path | None = None
    table: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _source(source: str | Record, cfg: RunConfig | None, progress: Progress | None,
            use_cache: bool = True) -> tuple[Record, str]:
    """A record and its default label from a Record, a record file, or a model spec (recorded now, or read from
    the curve cache for a built-in model: ``spp.cache``)."""
    from spp.errors import SppError
    from spp.files import RECORD_SUFFIXES, NotARecord, load_record

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
                    return record_run(model_cfg, progress=progress), path.stem
            except SppError as exc:
                raise SppError(f"{source} is not an spp record (it looks like {not_record.looks_like}) nor a "
                               f"model spp can load ({exc})") from None
    rec = record_cached(model_cfg, progress=progress, use_cache=use_cache)
    return rec, rec.label


def compare_sources(
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
    ``x=None``: block index when block counts are equal, relative depth otherwise. ``spp.comparison`` explains
    the alignment.
    """
    from spp import comparison as comparing
    from spp.errors import SppError

    sources = list(sources)
    if len(sources) < 2:
        raise SppError("compare needs at least two records or models, e.g. spp compare a.pt b.pt")
    labels = list(labels or [])
    if len(labels) > len(sources):
        raise SppError(f"{len(labels)} --label values for {len(sources)} records or models")
    comparing.check_x(x)
    comparing.check_align(align)
    if out is not None:
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
    messages = list(comparison.warnings)
    for rec, lab in zip(records, comparison.labels, strict=True):
        messages += nonfinite_messages(rec, lab)

    figure = None
    if out is not None:
        from spp import render

        fig = render.draw(records, x=x, labels=comparison.labels,  # type: ignore[arg-type]
                          title="SPP comparison: " + " vs ".join(comparison.labels))
        if _writes():
            render.save_figure(fig, out)
        figure = Path(out)
    if table is not None and _writes():
        write_table(comparison.table, table)
    return CompareResult(comparison, x, x_note, figure, Path(table) if table else None, messages)

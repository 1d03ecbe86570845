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

from spp.files import FIGURE_SUFFIXES, TABLE_SUFFIXES, check_output, commit_outputs, table_writer
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
    force: bool = False,
) -> PlotResult:
    """Record ``cfg.model`` and its references; draw the SPP to ``out``, the numbers to ``table``.

    Both are written as one unit (``spp.files.commit_outputs``); neither may be one of the run's inputs, and the
    table does not replace a record file or a file that is not an spp table unless ``force``.
    """
    from spp import render
    from spp.references import is_same_run, record_reference, reference_config, reference_names

    implicit_table = table is None
    table = table or default_table_path(out)
    inputs = run_inputs(cfg)
    check_output(out, FIGURE_SUFFIXES, "--out", inputs=inputs)
    check_output(table, TABLE_SUFFIXES, "--table" if not implicit_table else "the table next to --out",
                 inputs=inputs, replaces="table", force=force)
    rec = record_run(cfg, progress=progress)
    refs = []
    for name in reference_names(reference, rec.num_blocks):
        if is_same_run(cfg, reference_config(cfg, name)):
            continue  # the model is itself this reference: drawing it twice would hide nothing but cost a forward
        refs.append(record_reference(cfg, name, progress=progress, use_cache=use_cache))
    if _writes():  # under torchrun every rank records its shard; rank 0 alone writes
        fig = render.draw(rec, references=refs, title=_title(rec))
        commit_outputs([(out, lambda tmp: render.save_figure(fig, tmp)), *table_outputs(rec, table)],
                       inputs=inputs)  # figure and table replace the old ones together, or neither does
    return PlotResult(rec, refs, Path(out), Path(table), nonfinite=nonfinite_messages(rec), notes=run_notes(rec))


def table_outputs(rec: Record, table: str) -> list[tuple[str | Path, Any]]:
    """The table of ``rec`` at ``table``: one file; but a CSV whose record sidecar is there (a record replaced with
    ``--force``) is written as a record, sidecar and all, so the sidecar never describes another run."""
    from spp.files import record_outputs, sidecar

    if table.lower().endswith(".csv") and sidecar(table).is_file():
        return list(record_outputs(rec, table))
    return [(table, table_writer(rec.to_frame(), table))]


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
    from spp.errors import SppError
    from spp.loading import load_model, user_code_error

    loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                        checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    try:  # the traced rule runs the model's forward symbolically: the user's code, guarded like a recording
        return find_taps(loaded.model, blocks=list(cfg.blocks) or None, residual_tap=cfg.residual_tap)
    except SppError:
        raise
    except BaseException as exc:
        raise user_code_error(exc, f"finding the blocks of {loaded.name} (tracing its forward)") from None


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

    inputs = run_inputs(cfg)
    check_record_output(out, "--out", inputs=inputs)
    rec = record_run(cfg, progress=progress)
    path = save_record(rec, out, what="--out", inputs=inputs) if _writes() else Path(out)
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
    force: bool = False,
) -> CompareResult:
    """Compare record files, Records and model specs (recorded with ``cfg``'s model and input settings).

    Outputs and model specs are checked first, files loaded next, models recorded last, so a typo fails in a
    blink. The figure and table are written as one unit, never over one of the sources; the table replaces a
    record file or a file that is not an spp table only with ``force``.
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
    inputs = compare_inputs(sources, cfg)
    if out is not None:
        check_output(out, FIGURE_SUFFIXES, "--out", inputs=inputs)
    if table is not None:
        check_output(table, TABLE_SUFFIXES, "--table", inputs=inputs, replaces="table", force=force)

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
    outputs: list[tuple[str, Any]] = []
    if out is not None:
        from spp import render

        fig = render.draw(records, x=x, labels=comparison.labels,  # type: ignore[arg-type]
                          title="SPP comparison: " + " vs ".join(comparison.labels))
        outputs.append((out, lambda tmp: render.save_figure(fig, tmp)))
        figure = Path(out)
    if table is not None:
        outputs.append((table, table_writer(comparison.table, table)))
    if outputs and _writes():
        commit_outputs(outputs, inputs=inputs)  # figure and table together, or neither
    return CompareResult(comparison, x, x_note, figure, Path(table) if table else None, messages)


# ---- what a command reads: never overwritten by what it writes ----------------------------------------------
def _model_files(spec: str) -> list[str]:
    """The file a model spec reads, if any: a factory's .py file or a saved model (options after '?' dropped)."""
    from spp.loading import split_options

    name, _ = split_options(spec.strip()) if spec.strip() else (spec, {})
    path, sep, factory = name.rpartition(":")
    if sep and path.endswith(".py") and factory.isidentifier():
        return [path]
    return [name] if name and Path(name).is_file() else []


def run_inputs(cfg: RunConfig) -> list[str]:
    """Every file a run reads (model file, checkpoint, input tensor or images), so no output can replace one."""
    from spp.inputs import GAUSSIAN_NAMES, TENSOR_EXTENSIONS, find_images

    paths = _model_files(cfg.model) if cfg.model else []
    if cfg.checkpoint:
        paths.append(cfg.checkpoint)
    spec = cfg.input
    if spec is not None and spec.strip().lower() not in GAUSSIAN_NAMES:
        import os

        path = os.path.expanduser(spec)
        if path.lower().endswith(TENSOR_EXTENSIONS):
            paths.append(path)
        else:
            paths.extend(find_images(path))  # an output named like one of the images would replace it
    return paths


def compare_inputs(sources: Sequence[str | Record], cfg: RunConfig | None) -> list[str]:
    """The files ``spp compare`` reads (record files with their sidecars, model files, the run's inputs); model
    specs among the sources are checked here (``spp.loading.check_model_spec``), before anything is recorded."""
    from spp.files import RECORD_SUFFIXES, sidecar
    from spp.loading import check_model_spec

    paths: list[str] = []
    has_model = False
    for s in sources:
        if isinstance(s, Record):
            continue
        if not isinstance(s, str):
            from spp.errors import SppError

            raise SppError(f"compare takes record files, Records and model specs, not {type(s).__name__}")
        p = Path(s)
        if p.is_file() or (p.suffix.lower() in RECORD_SUFFIXES and not p.exists()):
            paths += [s, str(sidecar(s))] if p.suffix.lower() == ".csv" else [s]
            continue
        check_model_spec(s, cfg.model_kwargs if cfg is not None else None)
        paths += _model_files(s)
        has_model = True
    if has_model and cfg is not None:
        paths += run_inputs(replace(cfg, model=""))
    return paths


# ---- check ---------------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    record: Record
    findings: list[Any]  # spp.verdicts.Finding, errors first
    thresholds: Any  # spp.verdicts.Thresholds the check used
    exit_code: int  # 0 healthy, 1 errors, 3 NaN/Inf (spp.verdicts.exit_code)
    json_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from spp.verdicts import findings_to_json

        return findings_to_json(self.findings, self.thresholds)


def load_thresholds(path: str | None = None, **overrides: float | None) -> Any:
    """``spp.verdicts.Thresholds`` from a TOML file (checked to be a small regular file first) with ``overrides``
    (None: not given) on top; every value is checked by ``Thresholds`` itself."""
    from spp.files import MAX_TEXT_BYTES, check_input_file
    from spp.verdicts import Thresholds

    base = Thresholds()
    if path is not None:
        check_input_file(path, "--thresholds", max_bytes=MAX_TEXT_BYTES)
        base = Thresholds.from_toml(path)
    return base.replace(**overrides)


def check_source(
    cfg: RunConfig | None = None,
    *,
    record: str | Record | None = None,
    thresholds: Any = None,
    json_out: str | None = None,
    progress: Progress | None = None,
) -> CheckResult:
    """Verdicts (``spp.verdicts.check``) on ``cfg.model`` recorded now, or on a saved ``record`` (a file or a
    Record). ``json_out``: also write the JSON form (``findings_to_json``) to that file (``-``: leave it to the
    caller, which prints it). The gradient verdicts need gradient columns: ``cfg.grad`` (``--grad``) records them,
    as does a saved record made with ``--grad``.
    """
    import json

    from spp.errors import SppError
    from spp.files import check_input_file, load_record
    from spp.verdicts import Thresholds, check, exit_code

    has_model = cfg is not None and bool(cfg.model)
    if has_model == (record is not None):
        raise SppError("spp check needs --model or a record file (one of them, not both)")
    inputs: list[str] = []
    if isinstance(record, str):
        check_input_file(record, "record")
        inputs = [record] + ([str(Path(f"{record}.meta.json"))] if record.lower().endswith(".csv") else [])
    elif cfg is not None and has_model:
        inputs = run_inputs(cfg)
    if json_out is not None and json_out != "-":
        check_output(json_out, (".json",), "--json", inputs=inputs)
    t = thresholds if thresholds is not None else Thresholds()
    if isinstance(record, Record):
        rec = record
    elif isinstance(record, str):
        rec = load_record(record)
    else:
        assert cfg is not None
        rec = record_run(cfg, progress=progress)
    findings = check(rec, t)
    result = CheckResult(rec, findings, t, exit_code(findings), notes=run_notes(rec))
    if json_out is not None and json_out != "-" and _writes():
        text = json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n"

        def write(tmp: str) -> None:
            Path(tmp).write_text(text, encoding="utf-8")

        commit_outputs([(json_out, write)], inputs=inputs)
        result.json_path = Path(json_out)
    return result

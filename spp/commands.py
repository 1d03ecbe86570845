"""The library behind each CLI command: the CLI parses and prints, these do the work and return data, so a notebook
gets exactly what the CLI draws.

``plot_model`` (``spp plot``), ``record_to_file`` (``spp record``), ``compare_sources`` (``spp compare``),
``bn_report`` (``spp bn``), ``list_blocks`` and ``check_blocks`` (``spp blocks``), ``list_models`` (``spp models``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spp.errors import SppError
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
    x: str = "block"
    nonfinite: list[str] = field(default_factory=list)  # NaN/Inf in the activations: the CLI exits with code 3
    notes: list[str] = field(default_factory=list)  # worth knowing before reading the curves (warnings)
    figure_notes: list[str] = field(default_factory=list)  # what the panels say: clipped and zero points


def default_table_path(out: str) -> str:
    return str(Path(out).with_suffix(".csv"))


def plot_model(
    cfg: RunConfig,
    *,
    out: str = "spp.png",
    table: str | None = None,
    reference: str | None = None,
    x: str | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
    force: bool = False,
) -> PlotResult:
    """Record ``cfg.model`` and its references (``spp.references``: the kind, depth and inputs of the model's own
    run); draw the SPP to ``out`` and every curve's numbers to ``table`` (a ``model`` column names the curve).
    ``x``: block, relative, or None (relative when depths differ).

    Both are written as one unit (``spp.files.commit_outputs``); neither may be one of the run's inputs, and the
    table does not replace a record file or a file that is not an spp table unless ``force``.
    """
    from spp import render
    from spp.comparison import check_x
    from spp.references import check_reference_spec, references_for

    implicit_table = table is None
    table = table or default_table_path(out)
    inputs = run_inputs(cfg)
    check_output(out, FIGURE_SUFFIXES, "--out", inputs=inputs)
    check_output(table, TABLE_SUFFIXES, "--table" if not implicit_table else "the table next to --out",
                 inputs=inputs, replaces="table", force=force)
    _distinct_outputs({"--out": out, "--table": table})
    check_x(x)
    check_reference_spec(reference)
    rec = record_run(cfg, progress=progress)
    notes: list[str] = []
    refs = references_for(rec, reference, progress=progress, use_cache=use_cache, notes=notes)
    chosen = x or render.default_x([rec, *refs])
    figure_notes: list[str] = []
    if _writes():  # under torchrun every rank records its shard; rank 0 alone writes
        fig = render.draw(rec, references=refs, x=chosen, title=_title(rec), notes=figure_notes)  # type: ignore[arg-type]
        commit_outputs([(out, render.figure_writer(fig, out)), *table_outputs(rec, table, curves_frame(rec, refs))],
                       inputs=inputs)  # figure and table replace the old ones together, or neither does
    return PlotResult(rec, refs, Path(out), Path(table), chosen, nonfinite=nonfinite_messages(rec),
                      notes=notes + run_notes(rec), figure_notes=figure_notes)


def curves_frame(rec: Record, references: Sequence[Record] = ()) -> Any:
    """Every curve of a plot as one table: the model's rows, then each reference's, a ``model`` column first
    (the labels of the figure's legend)."""
    import pandas as pd

    from spp.render import reference_label

    mode = rec.settings.get("mode")
    frames = []
    for r, label in [(rec, rec.label), *((ref, reference_label(ref, mode)) for ref in references)]:
        df = r.to_frame()
        df.insert(0, "model", label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _distinct_outputs(paths: dict[str, str | None]) -> None:
    """Two outputs of one command naming the same file would overwrite each other: refuse before any work."""
    import os

    seen: dict[str, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise SppError(f"{seen[key]} and {flag} are the same file ({path}); give them different names")
        seen[key] = flag


def table_outputs(rec: Record, table: str, frame: Any = None) -> list[tuple[str | Path, Any]]:
    """The table at ``table`` (``frame``, default ``rec``'s rows): one file; but a CSV whose record sidecar is there
    (a record replaced with ``--force``) is written as ``rec``'s record, sidecar and all, so the sidecar never
    describes another run."""
    from spp.files import record_outputs, sidecar

    if table.lower().endswith(".csv") and sidecar(table).is_file():
        return list(record_outputs(rec, table))
    return [(table, table_writer(rec.to_frame() if frame is None else frame, table))]


def _writes() -> bool:
    """True unless this is a torchrun rank other than 0 (``spp.distributed``): only rank 0 writes files."""
    from spp.distributed import is_main_process

    return is_main_process()


def input_description(rec: Record) -> str:
    """What the record's run fed the model, in words: input kind, sample shape, samples, micro-batches, mode,
    seed (Gaussian only: files have no seed), skipped and dropped samples."""
    s = rec.settings
    kind = s.get("input", "gaussian")
    shape = s.get("input_shape")
    shape_text = "x".join(str(v) for v in shape) if shape else "?"
    samples = s.get("samples", s.get("num_samples"))
    sizes = s.get("micro_batch_sizes") or [s.get("batch_size")]
    batches = "micro-batches of " + " and ".join(str(v) for v in sizes)
    parts = [f"{kind} input {shape_text}", f"{samples} samples in {batches}", f"{s.get('mode', 'train')} mode"]
    if kind == "gaussian":
        parts.append(f"seed {s.get('seed')}")
    if s.get("skipped_images"):
        parts.append(f"{s['skipped_images']} unreadable image(s) skipped")
    if s.get("samples_dropped"):
        parts.append(f"{s['samples_dropped']} sample(s) dropped")
    return ", ".join(parts)


def _title(rec: Record) -> str:
    return f"SPP of {rec.label} — {input_description(rec)}"


def nonfinite_messages(rec: Record, label: str | None = None) -> list[str]:
    """One message when some tap's statistics are NaN or infinite (the CLI then exits with code 3)."""
    bad = [r for r in rec.rows if r["nonfinite"]]
    if not bad:
        return []
    first = bad[0]
    return [f"NaN/Inf in {len(bad)} of {len(rec.rows)} tap points of {label or rec.label}, first at block "
            f"{first['block']} ({first['name']}): see the 'nonfinite' column"]


def run_notes(rec: Record) -> list[str]:
    """What a user should know before reading the curves that the run did not already warn about: notes on blocks
    (a branch that is zero at init), each distinct note once."""
    notes: list[str] = []
    by_note: dict[str, list[str]] = {}
    for r in rec.rows:
        if r["note"]:
            by_note.setdefault(str(r["note"]), []).append(str(r["name"]))
    for note, names in by_note.items():
        where = names[0] if len(names) == 1 else f"{len(names)} blocks of {rec.label} ({names[0]}, ...)"
        notes.append(f"{where}: {note}")
    return notes


@dataclass
class BlockCheck:
    """What one micro-batch says of a tap: the channel ``axis`` proven on its output (-1: none), the residual
    identity's ``check`` (verified / unchecked / refused / '-' for the stem) and the row's ``note`` (why)."""

    axis: int
    shape: str
    check: str
    note: str


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


CHECK_SAMPLES = 2  # `spp blocks` verifies on one micro-batch of two samples (two: BatchNorm in train mode needs them)


def check_blocks(cfg: RunConfig) -> dict[str, BlockCheck]:
    """Per tap name, the verdict of a recording of one micro-batch of ``CHECK_SAMPLES`` samples of ``cfg``'s input:
    the channel axis proven and the residual identity checked, exactly as ``spp plot`` does on its first
    micro-batch. ``spp blocks`` prints it beside each tap, so the taps can be trusted before a long run."""
    rec = record_run(replace(cfg, num_samples=CHECK_SAMPLES, batch_size=CHECK_SAMPLES, grad=False))
    return {str(r["name"]): BlockCheck(int(r["axis"]), str(r["shape"]), str(r["check"]), str(r["note"]))
            for r in rec.rows}


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
    figure_notes: list[str] = field(default_factory=list)


DEFAULT_COMPARE_FIGURE = "compare.png"


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
    blink. The figure goes to ``out`` (default ``compare.png``), the aligned table to ``table`` when given, written
    as one unit, never over one of the sources; the table replaces a record file or a file that is not an spp table
    only with ``force``. ``x=None``: block (or layer) index when the depths are equal, relative depth otherwise.
    ``spp.comparison`` explains the alignment.
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
    out = out or DEFAULT_COMPARE_FIGURE
    check_output(out, FIGURE_SUFFIXES, "--out", inputs=inputs)
    if table is not None:
        check_output(table, TABLE_SUFFIXES, "--table", inputs=inputs, replaces="table", force=force)
    _distinct_outputs({"--out": out, "--table": table})

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

    from spp import render

    figure_notes: list[str] = []
    fig = render.draw(records, x=x, labels=comparison.labels,  # type: ignore[arg-type]
                      title="SPP comparison: " + " vs ".join(comparison.labels), notes=figure_notes)
    writers: dict[str, Any] = {out: render.figure_writer(fig, out)}
    if table is not None:
        writers[table] = table_writer(comparison.table, table)
    if _writes():
        commit_outputs(list(writers.items()), inputs=inputs)  # figure and table together, or neither
    else:
        render.close(fig)
    return CompareResult(comparison, x, x_note, Path(out), Path(table) if table else None, messages, figure_notes)


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
    from spp.inputs import input_files

    paths = _model_files(cfg.model) if cfg.model else []
    if cfg.checkpoint:
        paths.append(cfg.checkpoint)
    return paths + input_files(cfg.input)  # an output named like one of the images would replace it


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


# ---- bn ------------------------------------------------------------------------------------------------------
PRECISE_SUFFIXES = (".pt", ".pth")
BN_TOP = 10  # layers printed; the table holds them all


@dataclass
class BnResult:
    """What ``spp bn`` measured (``spp.bn``): the PreciseBN statistics, the EMA buffers' discrepancy per layer
    (worst first), the train / precise / EMA SPPs of the same inputs, the batch-size sweep, and the files written."""

    label: str
    batch_sizes: list[int]
    stats: Any  # spp.bn.PreciseStats
    discrepancy: list[Any]  # spp.bn.LayerDiscrepancy, worst first
    train_test: Any  # spp.bn.TrainTestSpp
    sweep: list[Any]  # spp.bn.BatchSizeResult per batch size (empty with one batch size)
    normalisation: str  # which samples each BatchNorm normalised over, in words
    inputs: str  # what the model was fed, in words
    table: Path | None = None
    precise_out: Path | None = None
    figure: Path | None = None
    notes: list[str] = field(default_factory=list)

    def divergence(self) -> list[dict[str, Any]]:
        """Per pair of (mini-batch, precise, EMA): the largest |log10| ratio of avg_var over the blocks and where."""
        out = []
        rows = self.train_test.divergence()
        for pair in ("minibatch/precise", "minibatch/ema", "precise/ema"):
            key = f"avg_var:{pair}"
            scored = [r for r in rows if r[key] == r[key]]
            worst = max(scored, key=lambda r: r[key], default=None)
            out.append({"pair": pair, "max_log10": worst[key] if worst else float("nan"),
                        "block": worst["block"] if worst else -1, "name": worst["name"] if worst else "",
                        "mean_log10": sum(r[key] for r in scored) / len(scored) if scored else float("nan")})
        return out


def parse_batch_sizes(text: str | int | Sequence[int]) -> list[int]:
    """``--batch-size 32`` or ``32,2,4,8``: whole numbers of at least 2, the first the PreciseBN micro-batch."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    else:
        items = list(text)
    sizes = []
    for item in items:
        try:
            size = int(item)
        except (TypeError, ValueError):
            raise SppError(f"--batch-size takes whole numbers separated by commas (32 or 32,2,4,8), not {text!r}") \
                from None
        if size < 2 or str(size) != str(item).strip():
            raise SppError(f"--batch-size {item}: a normalisation batch needs at least 2 samples (whole numbers)")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise SppError("--batch-size is empty")
    return sizes


def bn_report(
    cfg: RunConfig,
    *,
    batch_sizes: Sequence[int] | str | None = None,
    table: str | None = None,
    precise_out: str | None = None,
    plot: str | None = None,
    sync_bn: bool = False,
    progress: Progress | None = None,
) -> BnResult:
    """``spp bn``: the BatchNorm layers of ``cfg.model`` (with ``cfg.checkpoint`` loaded) on ``cfg``'s inputs.

    The first batch size is the micro-batch of PreciseBN and of the train / precise / EMA SPPs (default
    ``cfg.batch_size``); all of them (when more than one) are swept over the same samples. Samples: ``--num-samples``,
    else every sample of a file (images up to 256), else for Gaussian input 4 micro-batches of the largest batch
    size; a last micro-batch shorter than the batch size is dropped (it would have another normalisation batch).
    The model runs as ``spp.bn`` describes (train mode without touching the running buffers; everything restored
    bitwise); the checkpoint file is only read. ``precise_out``: the state_dict with the precise statistics in the
    running buffers, a file of plain tensors (``torch.load(..., weights_only=True)``). ``sync_bn``: under torchrun,
    BatchNorm becomes SyncBatchNorm for the run, so the normalisation batch spans the ranks.
    """
    import contextlib
    import os

    import torch

    from spp import bn as sppbn
    from spp import distributed
    from spp.devices import off_cpu, resolve_device
    from spp.inputs import make_input
    from spp.labels import config_label
    from spp.loading import load_model
    from spp.run import default_resolution, no_progress, normalisation_batches

    sizes = parse_batch_sizes(batch_sizes if batch_sizes is not None else cfg.batch_size)
    if cfg.dtype != "float32":
        raise SppError("spp bn measures statistics in float32: drop --dtype")
    for path, suffixes, flag in ((table, TABLE_SUFFIXES, "--table"), (precise_out, PRECISE_SUFFIXES, "--precise-out"),
                                 (plot, FIGURE_SUFFIXES, "--plot")):
        if path is not None:
            check_output(path, suffixes, flag, inputs=run_inputs(cfg))
    _distinct_outputs({"--table": table, "--precise-out": precise_out, "--plot": plot})
    if precise_out is not None and os.path.exists(precise_out):
        for given, flag in ((cfg.checkpoint, "--checkpoint"), (cfg.model, "--model")):
            if given and os.path.isfile(given) and os.path.samefile(given, precise_out):
                raise SppError(f"--precise-out {precise_out} is the {flag} file: spp never overwrites your model; "
                               "write the precise state_dict to another file")
    device = resolve_device(cfg.device)
    ctx = distributed.init_from_env(device)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                        checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    model = loaded.model.to(device) if device.type != "cpu" or off_cpu(loaded.model) else loaded.model
    sppbn.batchnorm_layers(model)  # the "no BatchNorm layer" error before any data is read
    resolution = default_resolution(cfg, loaded.data_config)
    in_chans = cfg.in_chans or cfg.model_kwargs.get("in_chans") or 3
    num_samples = cfg.num_samples
    gaussian = cfg.input is None or cfg.input.strip().lower() in ("gaussian", "gauss", "normal", "randn", "noise")
    if num_samples is None and gaussian:
        num_samples = 4 * max(sizes)
    source = make_input(cfg.input, num_samples=num_samples, batch_size=sizes[0], seed=cfg.seed, std=cfg.input_std,
                        data_config=loaded.data_config, resolution=resolution, in_chans=in_chans)
    source, _ = normalisation_batches(source, True)
    indices = ctx.shard(source.num_batches) if ctx.active else None
    batches = list(source.batches(indices, device=device))
    if ctx.active and sync_bn:
        sppbn._check_same_batch_count(len(batches))
    label = config_label(cfg)
    settings = source.describe()
    notes: list[str] = []
    tick = progress or no_progress
    world = ctx.world_size if ctx.active else 1
    sync = sppbn.sync_batchnorm(model) if sync_bn else contextlib.nullcontext(0)
    with sync as converted:
        if sync_bn and not converted:
            notes.append("--sync-bn without torchrun (one process): nothing to synchronise, BatchNorm left as it is")
        with tick(f"PreciseBN statistics of {label}", len(batches)) as on_batch:
            stats = sppbn.precise_bn_stats(model, batches, distributed=ctx.active, on_batch=on_batch)
        with tick(f"train / precise / EMA SPPs of {label}", 3 * len(batches)) as on_batch:
            train_test = sppbn.train_test_spp(model, batches, stats, distributed=ctx.active, on_batch=on_batch)
    discrepancy = sppbn.ema_discrepancy(model, stats)
    if stats.untracked:
        notes.append(f"{len(stats.untracked)} BatchNorm layer(s) have no running buffers (track_running_stats="
                     f"False: they normalise with batch statistics in eval mode too), e.g. {stats.untracked[0]}")
    if stats.unused:
        notes.append(f"{len(stats.unused)} BatchNorm layer(s) never ran on these inputs, e.g. {stats.unused[0]}: "
                     "no statistics, their buffers are left as they are")
    sweep: list[Any] = []
    if len(sizes) > 1:
        samples = torch.cat(batches) if batches else None
        if samples is None or samples.shape[0] < max(sizes):
            raise SppError(f"--batch-size {max(sizes)} needs at least {max(sizes)} samples"
                           + (" per rank" if ctx.active else "") + f"; there are "
                           f"{0 if samples is None else samples.shape[0]}: raise --num-samples")
        total = sum(int(samples.shape[0]) // b * 2 for b in sizes)
        with tick(f"normalisation batch sizes {','.join(map(str, sizes))}", total) as on_batch:
            sweep = sppbn.batch_size_sweep(model, samples, sizes, stats, on_batch=on_batch)
        if ctx.active:
            notes.append("the batch-size sweep runs on each rank's own samples (rank 0's shown)")
    if ctx.active and sync_bn and converted:
        normalisation = (f"normalisation batch: {world} ranks x {sizes[0]} = {world * sizes[0]} samples "
                         "(--sync-bn: SyncBatchNorm over all ranks' micro-batches)")
    elif ctx.active:
        normalisation = (f"normalisation batch: {sizes[0]} samples, the per-rank micro-batch ({world} ranks, "
                         f"{world * sizes[0]} per step): without --sync-bn each rank's BatchNorm normalises its own "
                         "micro-batch")
    else:
        normalisation = f"normalisation batch: {sizes[0]} samples per micro-batch (one process)"
    inputs = (f"{settings.get('input')} input {'x'.join(map(str, settings.get('input_shape') or []))}, "
              f"{stats.samples} samples in {stats.batches} micro-batches of {sizes[0]}")
    result = BnResult(label, sizes, stats, discrepancy, train_test, sweep, normalisation, inputs, notes=notes)
    writers: dict[Any, Any] = {}
    if table is not None:
        writers[table] = table_writer(sppbn.to_frame(discrepancy), table)
        result.table = Path(table)
    if precise_out is not None:
        state = {k: v.detach().cpu() for k, v in sppbn.precise_state_dict(model, stats).items()}
        writers[precise_out] = lambda tmp: torch.save(state, tmp)
        result.precise_out = Path(precise_out)
    if plot is not None:
        from spp import render

        fig = render.draw_bn(train_test, sweep, title=f"BatchNorm of {label}: {inputs}; {normalisation}")
        writers[plot] = render.figure_writer(fig, plot)
        result.figure = Path(plot)
    if writers and _writes():
        commit_outputs(list(writers.items()), inputs=run_inputs(cfg))
    return result

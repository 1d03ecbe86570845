"""The library behind each CLI command, one function per command and of the same name.

The CLI parses and prints; these do the work and return data, so a notebook gets exactly what the CLI draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spp.outputs import TABLE_SUFFIXES, check_output, write_table
from spp.record import Record
from spp.run import RunConfig, record_model

# progress(label, total_batches) -> a context manager yielding on_batch(samples) callbacks
Progress = Callable[[str, int], "contextlib.AbstractContextManager[Callable[[int], None]]"]


@contextlib.contextmanager
def _no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _batches(cfg: RunConfig) -> int:
    return -(-(cfg.num_samples or cfg.batch_size) // cfg.batch_size)


@dataclass
class PlotResult:
    record: Record
    references: list[Record]
    figure: Path
    table: Path
    warnings: list[str] = field(default_factory=list)


def default_table_path(out: str) -> str:
    return str(Path(out).with_suffix(".csv"))


def plot(
    cfg: RunConfig,
    *,
    out: str = "spp.png",
    table: str | None = None,
    reference: str | None = None,
    progress: Progress | None = None,
) -> PlotResult:
    """Record ``cfg.model`` and its references, draw the three-panel SPP to ``out``, the statistics to ``table``."""
    from spp import render
    from spp.references import record_reference, reference_names

    progress = progress or _no_progress
    table = table or default_table_path(out)
    check_output(out, render.FIGURE_SUFFIXES, "--out")
    check_output(table, TABLE_SUFFIXES, "--table")
    with progress(f"recording {cfg.label or cfg.model}", _batches(cfg)) as on_batch:
        rec = record_model(cfg, on_batch=on_batch)
    refs = []
    for name in reference_names(reference, rec.num_blocks):
        with progress(f"reference {name}", _batches(cfg)) as on_batch:
            refs.append(record_reference(cfg, name, on_batch=on_batch))
    fig = render.plot(rec, references=refs, title=_title(rec))
    render.save_figure(fig, out)
    write_table(rec.to_frame(), table)
    return PlotResult(rec, refs, Path(out), Path(table), warnings=nonfinite_warnings(rec))


def _title(rec: Record) -> str:
    s = rec.settings
    shape = s.get("input_shape")
    shape_text = "x".join(str(v) for v in shape) if shape else "?"
    return (f"SPP of {rec.label} — {s.get('input', 'gaussian')} input {shape_text}, {s.get('num_samples')} samples "
            f"in micro-batches of {s.get('batch_size')}, {s.get('mode')} mode, seed {s.get('seed')}")


def nonfinite_warnings(rec: Record) -> list[str]:
    bad = [r for r in rec.rows if r["nonfinite"]]
    if not bad:
        return []
    first = bad[0]
    return [f"NaN/Inf in {len(bad)} of {len(rec.rows)} tap points of {rec.label}, first at block {first['block']} "
            f"({first['name']}): see the 'nonfinite' column"]


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

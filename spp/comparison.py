"""Compare SPP records: align their tap points, find where they diverge, summarise per stage.

Alignment (``align="auto"``):

* **by tap name** when every record has the same tap names in the same order (the same architecture, e.g.
  one model at two seeds, with and without Scaled WS, in train and eval mode): row i of each record is
  compared with row i of the first, values exact.
* **by relative depth** otherwise (different depths or different code): the first record's tap points are the
  positions; block b of a record with L blocks sits at depth b / L, and every other record is read at the same
  depth, linearly interpolated between its two nearest blocks in log space (the plots' scale), or linearly
  where a neighbour is zero or negative. Stems (depth 0) and last blocks (depth 1) always line up; equal block
  counts need no interpolation at all.

``align="name"`` forces names and keeps only the names every record has; ``"relative"`` forces depths.
Divergence is ``log10(other / first)`` per statistic: 0 = identical, 1 = ten times larger. A zero, negative
or non-finite value on one side only counts as infinitely divergent (it is the explosion you are looking for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from spp.errors import SppError
from spp.records import Record
from spp.schema import STATISTICS

STATS = STATISTICS
# Settings that change what the statistics mean: listed in a warning when records disagree on them.
INPUT_SETTINGS = ("input", "input_shape", "resolution", "input_std", "mode", "batch_size", "num_samples",
                  "seed")
Align = Literal["auto", "name", "relative"]
ALIGNMENTS = ("auto", "name", "relative")
X_AXES = ("block", "relative")


def check_align(how: object) -> None:
    """``--align``: auto, name or relative."""
    if how not in ALIGNMENTS:
        raise SppError(f"--align must be auto, name or relative, not {how!r}")


def check_x(x: object) -> None:
    """``--x``: block or relative (None: chosen from the block counts)."""
    if x is not None and x not in X_AXES:
        raise SppError(f"--x must be block or relative, not {x!r}")
TOP = 5


@dataclass
class Comparison:
    """Aligned records. ``table``: one row per aligned tap point (wide: a column per label and statistic);
    ``divergence``: the top blocks per statistic and label by |log10 ratio|; ``stages``: per-stage ratios."""

    records: list[Record]
    labels: list[str]
    alignment: str  # "name" or "relative"
    alignment_note: str
    table: Any  # pandas.DataFrame
    divergence: Any
    stages: Any
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Every aligned value of every record equals the first record's (log ratio 0 everywhere)."""
        cols = [c for c in self.table.columns if ":log10_ratio:" in c]
        return bool(cols) and bool((self.table[cols].fillna(0.0) == 0.0).all().all())


# ---- labels, settings, x axis ------------------------------------------------------------------------------
def unique_labels(labels: Sequence[str], settings: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Labels made unique (``spp.labels.distinct_labels``): by the run setting that tells repeats apart, else
    numbered ``a``, ``a #2``."""
    from spp.labels import distinct_labels

    return distinct_labels(labels, settings)[0]


def settings_differences(records: Sequence[Record], labels: Sequence[str]) -> list[str]:
    """One warning listing the input settings the records disagree on (they are compared anyway)."""
    warnings = []
    unknown = [lab for rec, lab in zip(records, labels, strict=True)
               if not any(k in rec.settings for k in INPUT_SETTINGS)]
    if unknown:
        warnings.append(f"input settings unknown for {', '.join(unknown)} (a plain table?): cannot check "
                        "they match the others")
    diffs = []
    for key in INPUT_SETTINGS:
        values = [rec.settings.get(key) for rec in records]
        known = [(lab, v) for lab, v, rec in zip(labels, values, records, strict=True) if lab not in unknown]
        if len({repr(v) for _, v in known}) > 1:
            diffs.append(f"{key}: " + ", ".join(f"{lab}={_show(v)}" for lab, v in known))
    if diffs:
        warnings.insert(0, "settings differ (compared anyway): " + "; ".join(diffs))
    return warnings


def _show(v: Any) -> str:
    if isinstance(v, list):
        return "x".join(map(str, v))
    return "?" if v is None else str(v)


def default_x(records: Sequence[Record]) -> tuple[str, str]:
    """'block' when every record has the same depth (blocks, or layers for two-branch models), else 'relative';
    and a sentence saying why (``spp.render.default_x`` makes the same choice for a figure)."""
    from spp.render import branches, depth_of

    unit = "layer" if any(branches(r) for r in records) else "block"
    depths = [int(depth_of(r)) for r in records]
    if len(set(depths)) == 1:
        return "block", f"x axis: {unit} index (every record has {depths[0]} {unit}s)"
    return "relative", (f"x axis: relative depth ({unit} counts differ: {', '.join(map(str, depths))}); "
                        "--x block to override")


# ---- alignment ---------------------------------------------------------------------------------------------
def _names(rec: Record) -> list[str]:
    return [str(r["name"]) for r in rec.rows]


def _interpolate(values: Sequence[float], t: Fraction) -> float:
    """``values`` read at fractional index ``t``: exact on a block, log-linear between two positive values."""
    j = t.numerator // t.denominator
    w = t - j
    if w == 0:
        return values[j]
    a, b, wf = values[j], values[j + 1], float(w)
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    if a > 0 and b > 0:
        return a * (b / a) ** wf
    return a + (b - a) * wf


def align_positions(
    records: Sequence[Record], how: Align = "auto", labels: Sequence[str] | None = None
) -> tuple[str, list[int], list[list[Fraction]]]:
    """(kind, the first record's row indices kept, per record the fractional row index read at each)."""
    check_align(how)
    labels = list(labels) if labels is not None else [r.label for r in records]
    for rec, label in zip(records, labels, strict=True):
        if not rec.rows:
            raise SppError(f"no common blocks: {label} has no tap points at all")
    base = records[0]
    names = [_names(r) for r in records]
    if how == "name" or (how == "auto" and all(n == names[0] for n in names)):
        index = [{name: i for i, name in enumerate(n)} for n in names]
        keep = [i for i, name in enumerate(names[0]) if all(name in idx for idx in index)]
        if not [i for i in keep if base.rows[i]["stage"] != 0]:
            raise SppError("no common blocks: the records share no tap names besides the stem; "
                           "use --align relative to compare by depth")
        return "name", keep, [[Fraction(idx[names[0][i]]) for i in keep] for idx in index]
    for rec, label in zip(records, labels, strict=True):
        if rec.num_blocks < 1:
            raise SppError(f"no common blocks: {label} has no blocks after the stem")
    keep = list(range(len(base.rows)))
    depths = [Fraction(int(base.rows[i]["block"]), base.num_blocks) for i in keep]
    return "relative", keep, [[d * rec.num_blocks for d in depths] for rec in records]


def log_ratio(first: float, other: float) -> float:
    """log10(other / first); 0 when equal; ±inf when only one side is zero, negative or non-finite."""
    if first == other:
        return 0.0
    if math.isnan(first) and math.isnan(other):
        return math.nan
    if first > 0 and other > 0 and math.isfinite(first) and math.isfinite(other):
        return math.log10(other / first)
    return math.inf if (math.isnan(other) or other > first) else -math.inf


# ---- the comparison ----------------------------------------------------------------------------------------
def compare_records(
    records: Sequence[Record],
    labels: Sequence[str] | None = None,
    *,
    align: Align = "auto",
    top: int = TOP,
) -> Comparison:
    """Align ``records`` against the first and tabulate where they diverge (see the module docstring)."""
    import pandas as pd

    records = list(records)
    if len(records) < 2:
        raise SppError("compare needs at least two records or models")
    from spp.labels import distinct_labels

    labels = list(labels) if labels is not None else [r.label for r in records]
    if len(labels) != len(records):
        raise SppError(f"{len(labels)} labels for {len(records)} records")
    labels, label_notes = distinct_labels(labels, [r.settings for r in records])
    kind, keep, positions = align_positions(records, align, labels)
    base = records[0]

    values = {  # values[label][stat] -> list aligned with keep
        lab: {s: [_interpolate(rec.column(s), t) for t in pos] for s in STATS}
        for lab, rec, pos in zip(labels, records, positions, strict=True)
    }
    rows = []
    for k, i in enumerate(keep):
        row: dict[str, Any] = {
            "block": int(base.rows[i]["block"]),
            "name": base.rows[i]["name"],
            "stage": int(base.rows[i]["stage"]),
            "depth": int(base.rows[i]["block"]) / max(base.num_blocks, 1),
        }
        for j, lab in enumerate(labels):
            if j:
                row[f"{lab}:block"] = float(positions[j][k])
            for s in STATS:
                row[f"{lab}:{s}"] = values[lab][s][k]
        for lab in labels[1:]:
            for s in STATS:
                row[f"{lab}:log10_ratio:{s}"] = log_ratio(values[labels[0]][s][k], values[lab][s][k])
        rows.append(row)
    table = pd.DataFrame(rows)

    divergence = pd.DataFrame(_divergence(table, labels, top), columns=[
        "statistic", "label", "rank", "block", "name", "stage", "first", "other", "log10_ratio"])
    stages = pd.DataFrame(_stages(table, labels))
    if kind == "name":
        note = f"aligned by tap name ({len(keep) - 1} blocks after the stem)"
    else:
        counts = ", ".join(f"{lab} {r.num_blocks}" for lab, r in zip(labels, records, strict=True))
        exact = len({r.num_blocks for r in records}) == 1
        note = (f"aligned by relative depth (tap names differ; blocks: {counts})"
                + ("" if exact else f"; values interpolated at {labels[0]}'s blocks"))
    return Comparison(records, labels, kind, note, table, divergence, stages,
                      settings_differences(records, labels) + label_notes)


def _divergence(table, labels: Sequence[str], top: int) -> list[dict[str, Any]]:
    out = []
    rows = table.to_dict("records")
    for s in STATS:
        for lab in labels[1:]:
            col = f"{lab}:log10_ratio:{s}"
            scored = [(abs(r[col]), n) for n, r in enumerate(rows) if not math.isnan(r[col])]
            scored.sort(key=lambda sn: (-sn[0], sn[1]))
            for rank, (_, n) in enumerate(scored[:top], start=1):
                r = rows[n]
                out.append({"statistic": s, "label": lab, "rank": rank, "block": int(r["block"]),
                            "name": r["name"], "stage": int(r["stage"]),
                            "first": float(r[f"{labels[0]}:{s}"]), "other": float(r[f"{lab}:{s}"]),
                            "log10_ratio": float(r[col])})
    return out


def _stages(table, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per stage of the first record and per other label: the geometric-mean ratio of each statistic over the
    stage's blocks, and the largest |log10 ratio| of any statistic there."""
    out = []
    for stage, group in table.groupby("stage", sort=True):
        blocks = f"{int(group['block'].min())}-{int(group['block'].max())}" if stage else "0"
        for lab in labels[1:]:
            row: dict[str, Any] = {"stage": int(stage), "blocks": blocks, "label": lab}
            worst = 0.0
            for s in STATS:
                lr = [v for v in group[f"{lab}:log10_ratio:{s}"] if not math.isnan(v)]
                finite = [v for v in lr if math.isfinite(v)]
                row[f"{s}_ratio"] = 10 ** (sum(finite) / len(finite)) if finite else math.nan
                worst = max([worst, *(abs(v) for v in lr)])
            row["max_abs_log10_ratio"] = worst
            out.append(row)
    return out

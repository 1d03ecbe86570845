"""The record's columns, declared once: name, type, and one line of meaning.

Every producer and consumer of SPP rows uses this table: the recorder builds rows with exactly these keys,
``spp.files`` derives the column types it writes and checks what it reads, ``spp.render`` and ``spp.comparison``
take the statistics from it, and the CLI prints its meanings. Old record files that lack a column newer than them
read as the column's ``default``. Nothing here imports torch or pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

FORMAT_VERSION = 3  # 2: layer, branch, stream, axis, shape, check columns; 3: grad_* columns (older files lack them:
# they read as defaults)

Kind = Literal["float", "int", "str"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    meaning: str
    default: Any = None  # what a file written before this column existed reads as (a value, or a function of the row)

    @property
    def python_type(self) -> type:
        return {"float": float, "int": int, "str": str}[self.kind]


NAN = math.nan

COLUMNS: tuple[Column, ...] = (
    Column("block", "int", "tap index: 0 = the stem output, then 1..L in forward order (a layer with two residual "
           "branches gives two points)"),
    Column("layer", "int", "the block (layer) the tap belongs to: 0 = stem, then 1..; the taps of one layer share it",
           default=lambda row: int(row["block"])),
    Column("branch", "str", "which residual branch of its layer the tap measures ('attn', 'mlp', ...); '' when the "
           "layer has one", default=""),
    Column("name", "str", "the tap's name: the block's module name, plus '.attn' / '.mlp' for multi-branch layers"),
    Column("stage", "int", "0 = stem, then 1..S: the container holding the block"),
    Column("avg_sq_mean", "float", "average channel squared mean: per channel, the mean over every non-channel axis, "
           "squared, averaged over channels"),
    Column("avg_var", "float", "average channel variance: per channel, the population variance (ddof 0) over the "
           "same axes, averaged over channels"),
    Column("res_avg_var", "float", "residual average channel variance: avg_var of the residual branch, read before "
           "any scale and before the addition; NaN for the stem"),
    Column("expected_var", "float", "what the model's own bookkeeping expects for avg_var (NF models), else NaN",
           default=NAN),
    Column("grad_avg_sq_mean", "float", "avg_sq_mean of the loss's gradient with respect to the stream tensor (the "
           "tensor avg_var is read on), same axes; NaN without --grad", default=NAN),
    Column("grad_avg_var", "float", "avg_var of the loss's gradient with respect to the stream tensor; NaN without "
           "--grad", default=NAN),
    Column("grad_res_avg_var", "float", "avg_var of the loss's gradient with respect to the residual branch's "
           "output before any scale (where res_avg_var is read); NaN for the stem and without --grad", default=NAN),
    Column("channels", "int", "channel count at this tap"),
    Column("count", "int", "values per channel behind the statistics (N x H x W, or N x L, summed over micro-batches)"),
    Column("nonfinite", "int", "channels whose output or branch statistics (or, with --grad, their gradients') "
           "are NaN or infinite"),
    Column("axis", "int", "the stream tensor's channel axis, as proven from the layers around it (-1: unproven)",
           default=-1),
    Column("shape", "str", "the stream tensor's shape per sample, e.g. 64x32x32", default=""),
    Column("check", "str", "the residual identity output == act(shortcut + scale * branch) on the first "
           "micro-batch: verified, unchecked (with why in note), refused (no numbers), '-' for the stem",
           default=""),
    Column("module", "str", "qualified name of the block module"),
    Column("output_site", "str", "where the residual stream was read (module:output or module:input)"),
    Column("residual_site", "str", "where the residual branch was read ('' for the stem)"),
    Column("stream", "str", "what avg_var holds when it is not the plain sum after the addition (post-norm blocks: "
           "the norm's input)", default=""),
    Column("rule", "str", "the discovery rule that found the block"),
    Column("note", "str", "what to know about this point (a branch that is zero at init, ...)"),
)

NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
# The three curves of an SPP, in panel order.
STATISTICS: tuple[str, ...] = ("avg_sq_mean", "avg_var", "res_avg_var")
# The three gradient curves (``--grad``), in the same panel order.
GRAD_STATISTICS: tuple[str, ...] = ("grad_avg_sq_mean", "grad_avg_var", "grad_res_avg_var")
TITLES: dict[str, str] = {
    "avg_sq_mean": "Average channel squared mean",
    "avg_var": "Average channel variance",
    "res_avg_var": "Residual average channel variance",
    "grad_avg_sq_mean": "Gradient: average channel squared mean",
    "grad_avg_var": "Gradient: average channel variance",
    "grad_res_avg_var": "Gradient: residual average channel variance",
}


def check_row(row: dict[str, Any], where: str = "row") -> None:
    """Raise ValueError unless ``row`` has exactly the schema's columns (extra columns are allowed after them)."""
    missing = [n for n in NAMES if n not in row]
    if missing:
        raise ValueError(f"{where} lacks the columns {', '.join(missing)}")


def with_defaults(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every column it lacks that has a default (files written before the column existed)."""
    out = dict(row)
    for c in COLUMNS:
        if c.name not in out and c.default is not None:
            out[c.name] = c.default(out) if callable(c.default) else c.default
    return out

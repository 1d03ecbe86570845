"""A Record: the SPP statistics of one run, its stage boundaries and the settings that produced it.

Plain Python data only (floats, ints, strings, lists, dicts), so it saves to JSON or a weights-only ``.pt`` and
builds a DataFrame on demand. Importing this module imports neither torch nor pandas nor matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# Columns of Record.to_frame(), in order; every row dict holds exactly these keys.
COLUMNS = (
    "block",  # 0 = stem output, then 1..L (a block with two residual branches gives two points)
    "name",  # the tap's name (the block's qualified module name; ViT sub-blocks get .attn / .mlp)
    "stage",  # 0 = stem, then 1..S
    "avg_sq_mean",  # mean over channels of (per-channel mean)^2
    "avg_var",  # mean over channels of the per-channel population variance
    "res_avg_var",  # the same variance on the residual branch, before any scaling; NaN for the stem
    "expected_var",  # what the model's own bookkeeping expects for avg_var (NF-ResNets), else NaN
    "channels",  # channel count at this tap
    "count",  # values per channel that went into the statistics (N * H * W summed over micro-batches)
    "nonfinite",  # channels whose output or branch statistics are NaN/Inf
    "module",  # the block module
    "output_site",  # where the output was read
    "residual_site",  # where the branch was read ('' for the stem)
    "rule",  # how the block was found
    "note",  # e.g. the branch is exactly zero at init
)


@dataclass
class Record:
    """The statistics per tap point (``rows``), the stage ends (block indices) and the run's settings."""

    rows: list[dict[str, Any]]
    stage_ends: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- views -------------------------------------------------------------------------------------------------
    def to_frame(self):
        """One row per tap point, columns as ``spp.record.COLUMNS``; settings in ``df.attrs``."""
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=list(COLUMNS))
        df.attrs["stage_ends"] = list(self.stage_ends)
        df.attrs["settings"] = dict(self.settings)
        return df

    def column(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows]

    @property
    def label(self) -> str:
        return str(self.settings.get("label") or self.settings.get("model") or "model")

    @property
    def num_blocks(self) -> int:
        return len(self.rows) - 1

    @property
    def has_nonfinite(self) -> bool:
        return any(r["nonfinite"] for r in self.rows)

    def stage_summary(self) -> list[dict[str, Any]]:
        """Per stage: blocks, first/last variance, max squared mean, mean residual variance, non-finite channels."""
        out = []
        stages = sorted({r["stage"] for r in self.rows if r["stage"] > 0})
        for s in stages:
            rows = [r for r in self.rows if r["stage"] == s]
            res = [r["res_avg_var"] for r in rows if not math.isnan(r["res_avg_var"])]
            out.append(
                {
                    "stage": s,
                    "blocks": f"{rows[0]['block']}-{rows[-1]['block']}",
                    "first_var": rows[0]["avg_var"],
                    "last_var": rows[-1]["avg_var"],
                    "max_sq_mean": max(r["avg_sq_mean"] for r in rows),
                    "mean_res_var": sum(res) / len(res) if res else float("nan"),
                    "nonfinite": sum(r["nonfinite"] for r in rows),
                }
            )
        return out

    def _repr_html_(self) -> str:
        head = f"<b>SPP of {self.label}</b> — {self.num_blocks} blocks, stage ends {self.stage_ends}"
        return head + self.to_frame()[["block", "name", "stage", "avg_sq_mean", "avg_var", "res_avg_var"]].to_html(
            index=False, float_format=lambda v: f"{v:.4g}"
        )

    def __repr__(self) -> str:
        return f"Record({self.label!r}, blocks={self.num_blocks}, stage_ends={self.stage_ends})"

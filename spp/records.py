"""A Record: the SPP statistics of one run, its stage boundaries and the settings that produced it.

Plain Python data only (floats, ints, strings, lists, dicts), with views (a DataFrame, per-stage summaries). It
knows nothing of models, files or figures: ``spp.files`` saves and loads it, ``spp.render`` draws it,
``spp.comparison`` compares it. Importing this module imports neither torch nor pandas nor matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spp.schema import FORMAT_VERSION, NAMES


@dataclass
class Record:
    """The statistics per tap point (``rows``, keys as ``spp.schema.COLUMNS``), the stage ends (row indices of each
    stage's last tap) and the run's settings."""

    rows: list[dict[str, Any]]
    stage_ends: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_frame(self) -> Any:
        """One row per tap point, columns as ``spp.schema.COLUMNS``; stage ends and settings in ``df.attrs``."""
        import pandas as pd

        extra = [k for row in self.rows[:1] for k in row if k not in NAMES]
        df = pd.DataFrame(self.rows, columns=[*NAMES, *extra])
        df.attrs["stage_ends"] = list(self.stage_ends)
        df.attrs["settings"] = dict(self.settings)
        return df

    def column(self, key: str) -> list[float]:
        """One statistic as floats, in row order."""
        return [float(r[key]) for r in self.rows]

    @property
    def label(self) -> str:
        """What legends, titles and tables call this record."""
        return str(self.settings.get("label") or self.settings.get("model") or "model")

    @property
    def num_blocks(self) -> int:
        """Tap points after the stem."""
        return len(self.rows) - 1

    @property
    def has_nonfinite(self) -> bool:
        return any(r["nonfinite"] for r in self.rows)

    def stage_summary(self) -> list[dict[str, Any]]:
        """Per stage: blocks, first/last variance, max squared mean, mean residual variance, NaN/Inf count."""
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
        columns = ["block", "name", "stage", "avg_sq_mean", "avg_var", "res_avg_var"]
        return head + self.to_frame()[columns].to_html(index=False, float_format=lambda v: f"{v:.4g}")

    def __repr__(self) -> str:
        return f"Record({self.label!r}, blocks={self.num_blocks}, stage_ends={self.stage_ends})"

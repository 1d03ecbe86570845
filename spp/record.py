"""A Record: the SPP statistics of one run, its stage boundaries and the settings that produced it.

Plain Python data only (floats, ints, strings, lists, dicts), so it saves to JSON or a weights-only ``.pt``
(``spp.io``) and builds a DataFrame on demand. Importing this module imports neither torch nor pandas nor
matplotlib.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

    # ---- views ---------------------------------------------------------------------------------------------
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

    # ---- files and figures (imported on use, so this module stays light) ----------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write this record to ``path``: ``.pt``, ``.json``, ``.parquet`` or ``.csv`` (see ``spp.io``)."""
        from spp.io import save_record

        return save_record(self, path)

    def plot(self, ax=None, *, references: Sequence[Record] | str = (), x: str = "block",
             label: str | None = None, title: str | None = None):
        """Draw the three-panel SPP; returns the matplotlib Figure.

        ``ax``: None (a new figure) or three Axes (e.g. ``plt.subplots(1, 3)[1]``). ``references``: Records to
        draw behind this one, or a ``--reference`` string ("auto", "nf_resnet", "bn_relu_resnet50,...") that
        records them now with this record's input settings.
        """
        from spp import render

        if isinstance(references, str):
            references = _record_references(self, references)
        return render.plot(self, references=references, x=x, labels=[label] if label else None, title=title,
                           axes=ax)

    def _repr_html_(self) -> str:
        head = f"<b>SPP of {self.label}</b> — {self.num_blocks} blocks, stage ends {self.stage_ends}"
        columns = ["block", "name", "stage", "avg_sq_mean", "avg_var", "res_avg_var"]
        return head + self.to_frame()[columns].to_html(index=False, float_format=lambda v: f"{v:.4g}")

    def __repr__(self) -> str:
        return f"Record({self.label!r}, blocks={self.num_blocks}, stage_ends={self.stage_ends})"


def _record_references(rec: Record, spec: str) -> list[Record]:
    """The reference ResNets for ``rec``, recorded now on the input settings saved in ``rec`` (defaults where
    a record does not know them: 8 Gaussian samples at 128 px, seed 0)."""
    from spp.references import record_reference, reference_names
    from spp.run import RunConfig

    s = rec.settings
    shape = s.get("input_shape") or []
    resolution = s.get("resolution") or (shape[-1] if len(shape) >= 2 else None)
    cfg = RunConfig(model=str(s.get("model_spec") or s.get("model") or "model"),
                    model_kwargs=dict(s.get("model_kwargs") or {}), input_std=float(s.get("input_std", 1.0)),
                    num_samples=s.get("num_samples"), batch_size=int(s.get("batch_size", 8)),
                    resolution=resolution,
                    in_chans=shape[0] if len(shape) >= 3 else None, seed=int(s.get("seed", 0)))
    names = reference_names(None if spec.strip().lower() == "auto" else spec, rec.num_blocks)
    return [record_reference(cfg, name) for name in names]

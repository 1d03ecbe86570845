"""Record: plain data with views that follow the one column schema."""

from __future__ import annotations

import math

import pytest

from spp.records import Record
from spp.schema import COLUMNS, NAMES, STATISTICS, with_defaults


def row(block: int, stage: int, var: float, sq: float = 0.0, res: float = math.nan, **extra) -> dict:
    base = {c.name: c.python_type() for c in COLUMNS}
    base.update(block=block, layer=block, stage=stage, avg_var=var, avg_sq_mean=sq, res_avg_var=res,
                expected_var=math.nan, name=f"b{block}", **extra)
    return base


@pytest.fixture
def rec() -> Record:
    rows = [row(0, 0, 1.0), row(1, 1, 2.0, 0.1, 1.0), row(2, 1, 3.0, 0.3, 1.0), row(3, 2, 1.5, 0.2, 0.5),
            row(4, 2, 2.5, 0.05, 1.5, nonfinite=2)]
    return Record(rows=rows, stage_ends=[2, 4], settings={"label": "mine"})


def test_frame_has_the_schema_columns_in_order(rec):
    df = rec.to_frame()
    assert list(df.columns) == list(NAMES) and df.attrs["stage_ends"] == [2, 4]
    assert set(STATISTICS) <= set(NAMES)


def test_stage_summary_is_derived_from_the_rows(rec):
    s1, s2 = rec.stage_summary()
    assert s1 == {"stage": 1, "blocks": "1-2", "first_var": 2.0, "last_var": 3.0, "max_sq_mean": 0.3,
                  "mean_res_var": 1.0, "nonfinite": 0}
    assert s2["mean_res_var"] == 1.0 and s2["max_sq_mean"] == 0.2 and s2["nonfinite"] == 2
    assert rec.num_blocks == 4 and rec.has_nonfinite and rec.label == "mine"


def test_label_falls_back_to_the_model_name():
    assert Record(rows=[], stage_ends=[], settings={"model": "resnet50"}).label == "resnet50"
    assert Record(rows=[], stage_ends=[]).label == "model"


def test_rows_of_older_files_get_the_defaults():
    """A row written before layer / branch / stream existed: layer = its block, branch and stream empty."""
    old = {n: 0 for n in NAMES if n not in ("layer", "branch", "stream")} | {"block": 7}
    new = with_defaults(old)
    assert new["layer"] == 7 and new["branch"] == "" and new["stream"] == ""

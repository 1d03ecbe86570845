"""Figures: spp.render.draw draws exactly the recorded numbers, says what it cannot draw, and labels everything."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

import spp
from spp import render
from spp.errors import SppError
from spp.records import Record
from spp.run import RunConfig, record_run
from spp.schema import GRAD_STATISTICS, NAMES

TINY = {"width": 0.0625}


@pytest.fixture(scope="module")
def recs() -> list[Record]:
    a = record_run(RunConfig(model="nf_resnet50", model_kwargs=TINY, resolution=32, batch_size=2))
    b = record_run(RunConfig(model="bn_relu_resnet50", model_kwargs=TINY, resolution=32, batch_size=2))
    return [a, b]


def synthetic(label: str, columns: dict[str, list[float]], *, stage_ends: list[int] | None = None,
              settings: dict | None = None, branch: list[str] | None = None,
              layer: list[int] | None = None) -> Record:
    """A record with the given statistics per row (row 0 the stem), every other column neutral."""
    n = len(next(iter(columns.values())))
    rows = []
    for i in range(n):
        row = {k: "" for k in NAMES}
        row.update(block=i, layer=layer[i] if layer else i, branch=branch[i] if branch else "", name=f"b{i}",
                   stage=0 if i == 0 else 1, channels=4, count=8, nonfinite=0, expected_var=math.nan,
                   residual_site="" if i == 0 else f"b{i}.branch:output", avg_sq_mean=1.0, avg_var=1.0,
                   res_avg_var=math.nan if i == 0 else 1.0,
                   **dict.fromkeys(GRAD_STATISTICS, math.nan))  # as a record without --grad holds them
        for key, values in columns.items():
            row[key] = values[i]
        rows.append(row)
    return Record(rows=rows, stage_ends=stage_ends or [n - 1], settings={"label": label, **(settings or {})})


def lines_of(ax, label: str):
    return [line for line in ax.lines if line.get_label() == label]


def ys(line) -> list[float]:
    return [float(v) for v in line.get_ydata()]


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_record_plot_draws_the_numbers(recs):
    rec = recs[0]
    fig = spp.plot(rec)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    for ax, stat in zip(fig.axes, ("avg_sq_mean", "avg_var", "res_avg_var"), strict=True):
        (line,) = lines_of(ax, rec.label)
        drawn, recorded = ys(line), rec.column(stat)
        assert [a for a, b in zip(drawn, recorded, strict=True) if b == b] == [b for b in recorded if b == b]
        assert [float(v) for v in line.get_xdata()] == list(range(17))
        assert ax.get_ylabel().split()[0] == stat  # every panel names its column
    plt.close(fig)

    fig, axes = plt.subplots(1, 3)
    assert spp.plot(rec, axes=axes, x="relative") is fig
    assert float(lines_of(axes[1], rec.label)[0].get_xdata()[-1]) == 1.0
    with pytest.raises(SppError, match="need 3 matplotlib Axes"):
        spp.plot(rec, axes=axes[0])
    with pytest.raises(SppError, match="x must be 'block' or 'relative'"):
        spp.plot(rec, x="depth")
    plt.close(fig)


def test_two_runs_of_one_model_never_share_a_legend_entry(recs):
    """`render.draw([nf, nf])` showed 'nf_resnet600' twice; the labels now carry the options, else a number."""
    nf_nows = record_run(RunConfig(model="nf_resnet50", model_kwargs={**TINY, "ws": False}, resolution=32,
                                   batch_size=2))
    fig = render.draw([recs[0], nf_nows])
    texts = legend_texts(fig)
    assert "nf_resnet50 (width=0.0625)" in texts and "nf_resnet50 (width=0.0625, ws=False)" in texts
    plt.close(fig)
    fig = render.draw([recs[0], recs[0]])
    assert "nf_resnet50 (width=0.0625)" in legend_texts(fig) and "nf_resnet50 (width=0.0625) #2" in legend_texts(fig)
    plt.close(fig)


def test_stage_ends_and_theory_have_legend_entries(recs):
    """NF-ResNet-50 stages hold 3, 4, 6, 3 blocks: stage ends at blocks 3, 7, 13 (the last, 16, is the end)."""
    fig = render.draw(recs, labels=["NF", "BN"])
    ax = fig.axes[1]
    texts = legend_texts(fig)
    assert texts[:2] == ["NF", "BN"]
    assert "expected variance (theory)" in texts and "stage ends (in each curve's colour)" in texts
    for label in ("NF", "BN"):
        ends = [float(line.get_xdata()[0]) for line in ax.lines if line.get_label() == f"_stage end {label}"]
        assert ends == [3.0, 7.0, 13.0]
    theory = [line for line in ax.lines if line.get_label() == "_theory NF"]
    assert ys(theory[0])[1:4] == pytest.approx([1.04, 1.08, 1.12])  # 1 + k alpha^2, alpha 0.2
    assert len({line.get_color() for line in ax.lines if line.get_label() in ("NF", "BN")}) == 2
    plt.close(fig)


def test_log_panel_clips_below_its_floor_with_markers_and_a_note():
    """Top 10: references keep 8 decades, so the floor is 10 * 1e-8 / 2 = 5e-8; the ReLU-BN-Conv-like
    1e-14 points sit at the floor with a marker and the panel says how many; the user's 1e-3 stays as it is."""
    user = synthetic("mine", {"avg_sq_mean": [1.0, 1e-3, 1e-2, 1e-1]}, settings={"mode": "train"})
    ref = synthetic("ref", {"avg_sq_mean": [10.0, 1e-14, 3e-15, 2.0]}, settings={"mode": "train"})
    notes: list[str] = []
    fig = render.draw(user, references=[ref], notes=notes)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(5e-8)
    (marks,) = [line for line in ax.lines if line.get_label() == "_below ref"]
    assert [float(v) for v in marks.get_xdata()] == [1.0, 2.0] and ys(marks) == pytest.approx([5e-8] * 2)
    assert ys(lines_of(ax, "ref")[0]) == pytest.approx([10.0, 5e-8, 5e-8, 2.0])
    assert ys(lines_of(ax, "mine")[0]) == [1.0, 1e-3, 1e-2, 1e-1]
    assert notes == ["Average channel squared mean: ▼ ref: 2 point(s) below 5e-8 (down to 3.0e-15), drawn at the "
                     "floor"]
    assert any(notes[0].split(": ", 1)[1] in t.get_text() for t in ax.texts)
    assert "below the log floor, drawn at it" in legend_texts(fig)
    plt.close(fig)


def test_user_curve_stays_in_view_down_to_twelve_decades():
    """The user's 1e-11 under a reference top of 10 (12 decades) lowers the floor to 1e-11 / 2 instead of being
    clipped at 5e-8; an eval-mode explosion (user from 1e5 up to 1e12) keeps the user's curve whole and clips
    the references (8 decades below 1e12: floor 1e4 / 2) with a note."""
    user = synthetic("mine", {"avg_var": [1.0, 1e-11, 1e-5, 1.0]})
    ref = synthetic("ref", {"avg_var": [10.0, 1.0, 1.0, 1.0]})
    fig = render.draw(user, references=[ref])
    assert fig.axes[1].get_ylim()[0] == pytest.approx(0.5e-11)
    assert not [line for line in fig.axes[1].lines if line.get_label() == "_below mine"]
    plt.close(fig)

    exploding = synthetic("eval", {"avg_var": [1e5, 1e6, 1e8, 1e12]}, settings={"mode": "eval"})
    calm = synthetic("BN", {"avg_var": [1.0, 2.0, 3.0, 4.0]}, settings={"mode": "train", "family": "bn_relu_resnet",
                                                                       "depth": 50})
    notes: list[str] = []
    fig = render.draw(exploding, references=[calm], notes=notes)
    bottom, top = fig.axes[1].get_ylim()
    assert bottom == pytest.approx(0.5e4) and top >= 1e12
    assert ys(lines_of(fig.axes[1], "eval")[0]) == [1e5, 1e6, 1e8, 1e12]
    assert any("BN-ReLU-Conv 50 (train mode): 4 point(s) below 5e3" in n for n in notes)
    assert "BN-ReLU-Conv 50 (train mode)" in legend_texts(fig)  # a reference in another mode says so
    plt.close(fig)


def test_zero_curves_are_noted_on_log_and_linear_panels():
    """A branch that is exactly zero at init (timm's zero-init gains) is not silently invisible."""
    zero = synthetic("zero", {"res_avg_var": [math.nan, 0.0, 0.0, 0.0], "avg_var": [1.0, 1.0, 1.0, 1.0]})
    live = synthetic("live", {"res_avg_var": [math.nan, 1.0, 10.0, 100.0], "avg_var": [1.0, 2.0, 3.0, 4.0]})
    notes: list[str] = []
    fig = render.draw([zero, live], notes=notes)
    ax = fig.axes[2]
    assert ax.get_yscale() == "log"
    assert "Residual average channel variance: × zero: exactly 0 at 3 point(s) (every point), drawn at the floor" \
        in notes
    assert [line for line in ax.lines if line.get_label() == "_zero zero"]
    assert not any("NaN" in n for n in notes)  # the stem's residual is undefined, not a NaN to report
    plt.close(fig)
    notes = []
    fig = render.draw([zero], notes=notes)
    assert "Residual average channel variance: zero: exactly 0 at every point" in notes
    plt.close(fig)


def test_relative_x_is_the_default_when_depths_differ(recs):
    """A 16-block model over a 33-block reference: x = block / last block, each series its own stage ends."""
    deep = record_run(RunConfig(model="bn_relu_resnet101", model_kwargs=TINY, resolution=32, batch_size=2))
    deep.settings.update(family="bn_relu_resnet", depth=101)
    fig = render.draw(recs[0], references=[deep])
    ax = fig.axes[1]
    assert ax.get_xlabel().startswith("relative depth")
    mine = lines_of(ax, recs[0].label)[0]
    assert [float(v) for v in mine.get_xdata()] == [b / 16 for b in range(17)]
    ends = sorted(float(line.get_xdata()[0]) for line in ax.lines if line.get_label() == "_stage end "
                  "BN-ReLU-Conv 101")
    assert ends == [3 / 33, 7 / 33, 30 / 33]  # ResNet-101: 3, 4, 23, 3 blocks
    plt.close(fig)
    fig = render.draw(recs)  # same depth: block index
    assert fig.axes[0].get_xlabel() == "block index (0 = stem)"
    plt.close(fig)


def test_two_branch_layers_are_one_series_per_branch():
    """Taps stem, 1.attn, 1.mlp, 2.attn, 2.mlp: two lines against the layer index (0, 1, 2), no zig-zag."""
    rec = synthetic("tf", {"avg_var": [1.0, 1.1, 1.2, 1.3, 1.4], "res_avg_var": [math.nan, 0.1, 0.2, 0.3, 0.4]},
                    branch=["", "attn", "mlp", "attn", "mlp"], layer=[0, 1, 1, 2, 2])
    fig = render.draw(rec)
    ax = fig.axes[1]
    (attn,), (mlp,) = lines_of(ax, "tf · attn"), lines_of(ax, "tf · mlp")
    assert [float(v) for v in attn.get_xdata()] == [0.0, 1.0, 2.0] and ys(attn) == [1.0, 1.1, 1.3]
    assert [float(v) for v in mlp.get_xdata()] == [0.0, 1.0, 2.0] and ys(mlp) == [1.0, 1.2, 1.4]
    assert attn.get_linestyle() != mlp.get_linestyle()
    assert ax.get_xlabel() == "layer index (0 = stem)"
    plt.close(fig)


def test_repr_html_is_a_compact_table(recs):
    html = recs[0]._repr_html_()
    assert html.count("<tr") == 1 + 17 and "stage ends [3, 7, 13, 16]" in html

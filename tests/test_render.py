"""Figures: spp.render.draw and spp.plot draw exactly the recorded numbers, stage ends and references."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

import spp
import spp.hooks
from spp.errors import SppError
from spp.records import Record
from spp.run import RunConfig, record_run


@pytest.fixture(scope="module")
def recs() -> list[Record]:
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.0625}, resolution=32, batch_size=2)
    a = record_run(cfg)
    b = record_run(RunConfig(model="bn_relu_resnet50", model_kwargs={"width": 0.0625}, resolution=32,
                               batch_size=2))
    return [a, b]



def test_record_plot_draws_the_numbers(recs):
    rec = recs[0]
    fig = spp.plot(rec)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    for ax, stat in zip(fig.axes, ("avg_sq_mean", "avg_var", "res_avg_var"), strict=True):
        ys = [float(v) for v in ax.lines[0].get_ydata()]
        assert ys[1:] == rec.column(stat)[1:]
        assert [float(v) for v in ax.lines[0].get_xdata()] == list(range(17))
    plt.close(fig)

    fig = spp.plot(rec, references=[recs[1]], labels=["mine"])
    ax = fig.axes[1]
    assert [line.get_label() for line in ax.lines if not line.get_label().startswith("_")][:1] == ["bn_relu_resnet50"]
    assert [float(v) for v in next(line for line in ax.lines if line.get_label() == "mine").get_ydata()] == \
        rec.column("avg_var")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3)
    assert spp.plot(rec, axes=axes, x="relative") is fig
    assert float(axes[1].lines[0].get_xdata()[-1]) == 1.0
    with pytest.raises(SppError, match="need 3 matplotlib Axes"):
        spp.plot(rec, axes=axes[0])
    plt.close(fig)



def test_render_plot_draws_several_with_stage_ends(recs):
    fig = spp.render.draw(recs, labels=["NF", "BN"])
    ax = fig.axes[1]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["NF", "BN"]
    curves = [line for line in ax.lines if line.get_label() in ("NF", "BN")]
    assert len({line.get_color() for line in curves}) == 2
    verticals = [line for line in ax.lines if list(line.get_xdata()) == [line.get_xdata()[0]] * 2
                 and line.get_linestyle() == ":"]
    assert sorted(float(v.get_xdata()[0]) for v in verticals) == [3.0, 3.0, 7.0, 7.0, 13.0, 13.0]
    plt.close(fig)


def test_repr_html_is_a_compact_table(recs):
    html = recs[0]._repr_html_()
    assert html.count("<tr") == 1 + 17 and "stage ends [3, 7, 13, 16]" in html

"""spp.plot: references recorded on the record's own inputs, through the CLI's curve cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import spp
from spp.commands import plot_model
from spp.run import RunConfig, record_run

TINY = {"width": 0.0625}


@pytest.fixture
def images(tmp_path):
    """Six random RGB images: a real-data input whose settings hold lists (mean, std), not a float."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder




def test_references_of_an_image_record_use_its_images(images, cache_misses):
    """A record made from images gets references on the same images (this raised TypeError before)."""
    cfg = RunConfig(model="nf_resnet50", model_kwargs=TINY, input=str(images), resolution=32, batch_size=3)
    rec = record_run(cfg)
    assert rec.settings["input"] == "images" and isinstance(rec.settings["input_std"], list)
    fig = spp.plot(rec, references="bn_relu_resnet")
    (ref,) = [r for r in _references(fig)]
    assert cache_misses == ["bn_relu_resnet50"]
    again = record_run(RunConfig(model="bn_relu_resnet50", model_kwargs=TINY, input=str(images), resolution=32,
                                 batch_size=3))
    assert ref == [row["avg_var"] for row in again.rows]  # the same images, the same micro-batches


def _references(fig) -> list[list[float]]:
    """The y-values of the reference curves in the variance panel (the thin, non-user lines)."""
    ax = fig.axes[1]
    return [[float(v) for v in line.get_ydata()] for line in ax.lines
            if line.get_linewidth() < 2.0 and not line.get_label().startswith("_") and "expected" not in
            line.get_label()]


def test_notebook_reuses_the_references_the_cli_recorded(tmp_path, cache_misses):
    """`spp plot` then `spp.plot(rec, references="auto")` on its record: the same cache keys, nothing recorded
    again, and the model is not drawn a second time as its own reference."""
    cfg = RunConfig(model="nf_resnet50", model_kwargs=TINY, resolution=32, batch_size=2)
    result = plot_model(cfg, out=str(tmp_path / "a.png"))
    assert sorted(cache_misses) == ["bn_relu_resnet50", "relu_bn_resnet50"]
    cache_misses.clear()
    fig = spp.plot(result.record, references="auto")
    assert cache_misses == [] and len(_references(fig)) == 2

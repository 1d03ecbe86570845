"""What a recording's mode means, and that the model comes back exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spp.hooks
from spp.modelstate import ModelState
from tests.helpers import capture_outputs, direct_stats


class Noisy(nn.Module):
    """conv -> BN -> dropout module -> functional dropout keyed on the block's own flag (as HF attention does)."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x + F.dropout(self.drop(self.bn(self.conv(x))), 0.3, self.training)


class Meddler(nn.Module):
    """A forward that touches what it should not: a Python counter, a new attribute, a reassigned buffer and a
    buffer changed in place."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.calls = 0
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(c))

    def forward(self, x):
        self.calls += 1
        self.last_shape = tuple(x.shape)
        self.steps = self.steps + 1
        self.seen.add_(x.mean((0, 2, 3)))
        return x + self.conv(x)


def chain(*blocks: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(6, 6, 1), nn.Sequential(*blocks))


def x(seed: int = 0, c: int = 6) -> torch.Tensor:
    return torch.randn(4, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_train_mode_means_batch_statistics_not_randomness():
    """Two train-mode records are identical (dropout off, module and functional), and BN normalised with the
    micro-batch's statistics: its output has per-channel mean 0 and variance var / (var + eps) ~ 1."""
    torch.manual_seed(0)
    model = chain(Noisy(), Noisy())
    a = spp.hooks.record(model, x(), mode="train")
    b = spp.hooks.record(model, x(), mode="train")
    assert a.rows == b.rows
    with ModelState(model, "train"):
        bn_out = capture_outputs(model, ["1.0.bn"], [x()])["1.0.bn"][0]
        assert model[1][0].bn.training and not model[1][0].drop.training and not model[1][0].training
    sq_mean, var = direct_stats(bn_out)
    assert sq_mean < 1e-12 and abs(var - 1) < 1e-3


def test_stochastic_keeps_dropout_live():
    torch.manual_seed(0)
    model = chain(Noisy(), Noisy())
    a = spp.hooks.record(model, x(), mode="train", stochastic=True)
    b = spp.hooks.record(model, x(), mode="train", stochastic=True)
    assert a.rows[0] == b.rows[0]  # the stem: before any dropout
    assert a.rows[1]["avg_var"] != b.rows[1]["avg_var"]  # the stream after a live dropout differs per call
    assert a.settings["stochastic"] is True


@pytest.mark.parametrize("fail", [False, True])
def test_everything_the_forward_touched_comes_back(fail):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sequential(Meddler(), Meddler()), nn.BatchNorm2d(4))
    model.train()
    model[1][1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = model[1][0].steps
    flags = [m.training for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    inputs = [x(0, 4), torch.randn(4, 3, 8, 8)] if fail else [x(0, 4)]  # the second batch has 3 channels: raises
    with pytest.raises(RuntimeError) if fail else _nothing():
        spp.hooks.record(model, inputs, mode="eval", blocks=["1.*"])  # untraceable: named
    meddler = model[1][0]
    assert meddler.calls == 0 and not hasattr(meddler, "last_shape") and meddler.steps is steps
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags and model[2].track_running_stats
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mode_none_leaves_the_model_alone():
    model = chain(Noisy())
    model.train()
    state = ModelState(model, None)
    state.apply()
    assert all(m.training for m in model.modules())
    state.restore()
    assert all(m.training for m in model.modules())

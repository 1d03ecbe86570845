"""find_taps: stages, layers, --blocks patterns, --residual-tap, refusals.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from spp import hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.taps import Site
from tests.helpers import (
    capture_sites,
    check_recorder_reads_the_same,
    direct_stats,
    image,
    residual_value,
    tap_sites,
    timm_model,
    tv_model,
)
from tests.toys import Chain, PreActToy, UntraceableToy


def test_stages_follow_the_containers():
    taps = find_taps(timm_model("resnet50"))
    assert [t.stage for t in taps] == [0] + [1] * 3 + [2] * 4 + [3] * 6 + [4] * 3


def test_blocks_patterns_and_residual_tap_override():
    model = tv_model("resnet18")
    taps = find_taps(model, blocks=["layer2.*"], residual_tap="conv2")
    assert [t.module for t in taps[1:]] == ["layer2.0", "layer2.1"]
    assert [t.residual for t in taps[1:]] == [Site("layer2.0.conv2"), Site("layer2.1.conv2")]
    assert taps[1].rule == "--blocks + torchvision ResNet BasicBlock: branch = bn2, --residual-tap conv2"
    x = image()
    values = capture_sites(model, tap_sites(taps), x)
    check_recorder_reads_the_same(model, taps, values, x)
    with pytest.raises(SppError, match="matched no module"):
        find_taps(model, blocks=["nothing*"])
    with pytest.raises(SppError, match="has no child 'conv9'"):
        find_taps(model, residual_tap="conv9")


def test_blocks_pattern_on_unprovable_modules_reads_output_minus_input():
    model = Chain(UntraceableToy(), UntraceableToy()).eval()
    taps = find_taps(model, blocks=["blocks.?"])
    assert [t.rule for t in taps[1:]] == ["--blocks (output - input)"] * 2
    x = image(size=8, chans=4).abs() + 0.1  # positive sum: the x + conv(x) path
    values = capture_sites(model, tap_sites(taps), x)
    torch.testing.assert_close(residual_value(taps[1], values), model.blocks[0].conv(values[Site("blocks.0", "input")]))
    check_recorder_reads_the_same(model, taps, values, x)


def test_torchscript_is_refused_with_a_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still loadable
        scripted = torch.jit.script(Chain(PreActToy()))
    with pytest.raises(SppError, match="TorchScript models run their forward in C\\+\\+"):
        find_taps(scripted)



class _Mine(nn.Module):
    """A block no built-in rule knows how to read before its scale: out = x + 0.5 * body(x)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + 0.5 * self.body(x)


def test_a_user_rule_list_is_plain_data():
    """A rule passed first wins; the default list is untouched; the recorder reads the rule's branch."""
    from spp.discovery import DEFAULT_RULES, Rule
    from spp.taps import Tap

    def mine(name, module):
        if isinstance(module, _Mine):
            return [Tap(name, name, -1, Site(name), Site(f"{name}.body"), rule="my block")]
        return None

    model = Chain(_Mine(), _Mine())
    before = tuple(DEFAULT_RULES)
    taps = find_taps(model, rules=[Rule("mine", mine), *DEFAULT_RULES])
    assert [t.rule for t in taps[1:]] == ["my block", "my block"] and before == DEFAULT_RULES
    x = image(chans=4)
    rec = hooks.record(model, x, mode="eval", taps=taps)
    body = capture_sites(model, {Site("blocks.0.body")}, x)[Site("blocks.0.body")]
    assert math.isclose(rec.rows[1]["res_avg_var"], direct_stats(body)[1], rel_tol=1e-6)


def test_no_rules_finds_nothing():
    with pytest.raises(SppError, match="no residual block found in Chain, though 1 module"):
        find_taps(Chain(_Mine()), rules=[])


class _Counting(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last = x.shape
        return x + self.conv(x)


def test_discovery_leaves_the_users_model_alone():
    """Tracing runs a forward's Python code; whatever it touched is put back."""
    model = Chain(_Counting())
    taps = find_taps(model)
    assert len(taps) == 2 and model.blocks[0].calls == 0 and not hasattr(model.blocks[0], "last")

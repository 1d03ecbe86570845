"""spp.validate: each user value is checked once, strictly; a value spp cannot honour is an error, never a clamp."""

from __future__ import annotations

import math

import pytest

from spp.errors import SppError
from spp.loading import builtin_options, split_options
from spp.models.resnet import scaled
from spp.validate import (
    MIN_RESNET_WIDTH,
    SEED_MAX,
    check_channel_dim,
    check_seed,
    finite_number,
    parse_bool,
    whole_number,
)


@pytest.mark.parametrize("text,value", [("true", True), ("FALSE", False), ("1", True), ("0", False), ("yes", True),
                                        ("No", False), (" true ", True), (True, True), (0, False), (1, True)])
def test_booleans_are_the_six_words(text, value):
    assert parse_bool(text, "x") is value


@pytest.mark.parametrize("text", ["maybe", "on", "off", "", "tru", 2, -1, 0.0, None, "null"])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(SppError, match="must be true or false"):
        parse_bool(text, "x")


def test_numbers_are_finite_and_in_range():
    assert finite_number("2.5", "w", text=True) == 2.5
    for bad, match in ((math.nan, "finite"), (math.inf, "finite"), (10**400, "finite"), ("abc", "a number"),
                       (True, "a number"), (None, "a number")):
        with pytest.raises(SppError, match=match):
            finite_number(bad, "w", text=True)
    with pytest.raises(SppError, match="positive"):
        finite_number(0, "w", positive=True)
    with pytest.raises(SppError, match="at most 16"):
        finite_number(16.5, "w", maximum=16)
    assert whole_number("12", "n", text=True) == 12
    for bad in (1.5, True, "1.0", "x"):
        with pytest.raises(SppError, match="whole number"):
            whole_number(bad, "n", text=True)


def test_seeds_are_64_bit():
    assert check_seed(0) == 0 and check_seed(SEED_MAX) == 2**64 - 1
    for bad in (-1, 2**64, 99999999999999999999999):
        with pytest.raises(SppError, match="--seed must be at"):
            check_seed(bad)


def test_channel_dim_bounds():
    """An activation has at most 6 axes: -6..5 can exist, 7 and -9 cannot (they used to wrap modulo the rank)."""
    assert [check_channel_dim(d) for d in (None, -6, -1, 0, 5)] == [None, -6, -1, 0, 5]
    for bad in (6, 7, -7, -9):
        with pytest.raises(SppError, match="--channel-dim must be at"):
            check_channel_dim(bad)


def test_minimum_width_is_the_first_that_needs_no_floor():
    """Channels are round(c * width / 4) * 4, floored at 4. The smallest layer is the 64-channel stem: at width 4/64
    it gets exactly 4 channels, as asked; below, 64 * width < 4 channels cannot be built, and the rounding and the
    floor at 4 would decide the size instead of the width (at 0.03 the rounding gives 0 and the floor makes it 4:
    the issue's silent clamp, which also gave every layer of --width 0, -1, 1e-9 four channels)."""
    assert MIN_RESNET_WIDTH == 4 / 64
    assert round(64 * MIN_RESNET_WIDTH / 4) * 4 == 4 == scaled(64, MIN_RESNET_WIDTH)
    assert round(64 * 0.03 / 4) * 4 == 0 and scaled(64, 0.03) == 4  # what the floor used to hide
    with pytest.raises(SppError, match=r"at least 0\.0625"):
        builtin_options("nf_resnet50", {"width": 0.03})


@pytest.mark.parametrize("spelling", ["no", "false", "False", "0", '"false"'])
def test_ws_false_in_any_spelling(spelling):
    name, options = split_options(f"nf_resnet50?ws={spelling}")
    assert name == "nf_resnet50" and builtin_options(name, options) == {"ws": False}


def test_builtin_options_are_typed():
    """Numeric text is parsed, whole-number floats from the CLI's float --width become ints for transformers
    (d_model), and unknown names list the options the family has."""
    assert builtin_options("nf_resnet50", {"width": "0.25", "alpha": "0.3", "in_chans": "1"}) == {
        "width": 0.25, "alpha": 0.3, "in_chans": 1}
    assert builtin_options("preln_transformer6", {"width": 64.0, "causal": "no"}) == {"width": 64, "causal": False}
    with pytest.raises(SppError, match=r"must be a whole number, not 64\.5"):
        builtin_options("preln_transformer6", {"width": 64.5})
    with pytest.raises(SppError, match=r"bn_relu_resnet50 has no option 'alpha'; its options: .*norm"):
        builtin_options("bn_relu_resnet50", {"alpha": 0.2})
    assert builtin_options("bn_relu_resnet50", {"groups": None}) == {"groups": None}


def test_query_options_are_strict():
    assert split_options("nf_resnet50?ws=false,alpha=0.3") == ("nf_resnet50", {"ws": False, "alpha": 0.3})
    assert split_options("nf_resnet50?ws=false,") == ("nf_resnet50", {"ws": False})  # a trailing comma is harmless
    for spec, match in (("nf_resnet50?ws=1,ws=0", "given twice"), ("nf_resnet50?=1", "KEY=VALUE"),
                        ("nf_resnet50?a b=1", "not a keyword name"), ("nf_resnet50?ws", "KEY=VALUE")):
        with pytest.raises(SppError, match=match):
            split_options(spec)

"""The traced fallback: it claims a module only when the graph proves shortcut + branch, and reads the branch
before its scale.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spp.discovery as discovery
from spp import hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.taps import Difference, Site
from tests.helpers import (
    blocks,
    capture_sites,
    check_recorder_reads_the_same,
    direct_stats,
    image,
    residual_value,
    tap_sites,
    timm_model,
    tv_model,
)
from tests.toys import (
    ActAfterFunctionalToy,
    Chain,
    FunctionalToy,
    HeadAfterAddToy,
    InplaceToy,
    NamedShortcutToy,
    NestedToy,
    NotResidualToy,
    ParallelHeadsToy,
    PooledShortcutToy,
    PostActProjToy,
    PostNormToy,
    PreActToy,
    ReshapeToy,
    ResScaleToy,
    ScaledToy,
    TokenMixToy,
    TwoAddToy,
    TwoStreams,
    UntraceableToy,
)


@pytest.mark.parametrize(
    ("block", "site", "label"),
    [
        (PreActToy(), "blocks.0.branch", "fallback (traced add): branch = branch"),
        (PostActProjToy(), "blocks.0.bn", "fallback (traced add): branch = bn"),
        # x + 0.5 * relu(conv(x)): no module returns relu(conv(x)), so it is read as (output - input) / 0.5:
        # the branch before its scale, exactly (never the scaled branch under the branch's name)
        (FunctionalToy(), None, "fallback (traced add): output - input, divided by 0.5 (before its scaling)"),
    ],
)
def test_fallback_on_conv_toys(block, site, label):
    model = Chain(block).eval()
    x = image(size=8, chans=4)
    taps = find_taps(model)
    assert len(taps) == 2 and taps[1].rule == label
    tap = taps[1]
    values = capture_sites(model, tap_sites(taps), x)
    inp = values[Site("blocks.0", "input")]
    if site is None:
        assert tap.residual == Difference(Site("blocks.0"), Site("blocks.0", "input")) and tap.residual_scale == "0.5"
        expected_branch = F.relu(block.conv(inp))
    else:
        assert tap.residual == Site(site)
        expected_branch = dict(model.named_modules())[site](
            block.conv(inp) if isinstance(block, PostActProjToy) else inp
        )
    torch.testing.assert_close(residual_value(tap, values), expected_branch)
    check_recorder_reads_the_same(model, taps, values, x)


def test_fallback_named_shortcut_decides_between_equal_paths():
    model = Chain(NamedShortcutToy()).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.stack") and taps[1].rule == "fallback (traced add): branch = stack"
    x = image(size=8, chans=4)
    values = capture_sites(model, tap_sites(taps), x)
    torch.testing.assert_close(values[Site("blocks.0.stack")] + model.blocks[0].shortcut(x), values[taps[1].output])


def test_difference_survives_an_in_place_add():
    model = Chain(InplaceToy(), stem=nn.Conv2d(4, 4, 1)).eval()
    taps = find_taps(model)
    assert taps[1].residual == Difference(Site("blocks.0"), Site("blocks.0", "input"))
    x = image(size=8, chans=4)
    with torch.no_grad():
        branch = F.relu(model.blocks[0].conv(model.stem(x)))  # before its 0.5
    rec = hooks.record(model, x, mode="eval", taps=taps)
    assert math.isclose(rec.rows[1]["res_avg_var"], direct_stats(branch, 1)[1], rel_tol=1e-5)


def test_fallback_two_additions_on_tokens():
    model = Chain(TwoAddToy(), TwoAddToy()).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    taps = find_taps(model)
    assert [t.name for t in taps] == [
        "stem",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
    ]
    assert taps[1].output == Site("blocks.0.norm2", "input") and taps[2].output == Site("blocks.0")
    assert all(t.channel_dim is None for t in taps)  # the fallback guesses no axis: the recorder proves it
    rec = hooks.record(model, x, mode="eval", taps=taps)
    assert [r["axis"] for r in rec.rows] == [2] * 5 and all(r["check"] != "refused" for r in rec.rows)
    values = capture_sites(model, tap_sites(taps), x)
    for tap in blocks(taps):
        shortcut = Site(tap.module, "input") if tap.name.endswith("attn") else Site(f"{tap.module}.norm2", "input")
        torch.testing.assert_close(values[shortcut] + values[tap.residual], values[tap.output])
    check_recorder_reads_the_same(model, taps, values, x)


def test_fallback_reads_the_branch_before_a_parameter_scale():
    model = Chain(ScaledToy()).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.mlp") and "before its scaling" in taps[1].rule
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))  # 2-D (B, C)
    values = capture_sites(model, tap_sites(taps), x)
    torch.testing.assert_close(values[Site("blocks.0")], x + model.blocks[0].gamma * values[Site("blocks.0.mlp")])


@pytest.mark.parametrize(
    "toy", [NotResidualToy, UntraceableToy, ActAfterFunctionalToy, ParallelHeadsToy, PooledShortcutToy]
)
def test_fallback_claims_nothing_it_cannot_prove(toy):
    model = Chain(toy(), toy()).eval()
    with pytest.raises(SppError, match=r"no residual (block found in Chain, though .* --blocks|addition in Chain)"):
        find_taps(model)


@pytest.mark.parametrize(("source", "name"), [("tv", "resnet18"), ("timm", "vit_tiny_patch16_224")])
def test_fallback_agrees_with_the_family_rules(source, name):
    """With the family rules switched off, the traced fallback finds the same blocks and the same sites."""
    model = tv_model(name) if source == "tv" else timm_model(name, img_size=32, patch_size=8, depth=3)
    specific = find_taps(model)
    traced = find_taps(model, rules=[r for r in discovery.DEFAULT_RULES if r.name in ("spp", "fallback (traced add)")])
    assert all(t.rule.startswith("fallback (traced add)") for t in blocks(traced))
    assert [(t.module, t.output, t.residual) for t in traced] == [(t.module, t.output, t.residual) for t in specific]
    x = image() if source == "tv" else image(size=32)
    proven = [[r["axis"] for r in hooks.record(model, x, mode="eval", taps=taps).rows] for taps in (traced, specific)]
    assert proven[0] == proven[1] and -1 not in proven[0]


def test_fallback_finds_blocks_of_unknown_families():
    """torchvision MobileNetV2 has no family rule: its 10 residual InvertedResiduals are found by tracing."""
    model = tv_model("mobilenet_v2")
    taps = find_taps(model)
    with_skip = [n for n, m in model.named_modules() if getattr(m, "use_res_connect", False)]
    assert [t.module for t in blocks(taps)] == with_skip and len(with_skip) == 10
    x = image()
    values = capture_sites(model, tap_sites(taps), x)
    for tap in blocks(taps):
        torch.testing.assert_close(values[Site(tap.module, "input")] + values[tap.residual], values[tap.output])



# ---- what the fallback understands beyond a plain x + f(x) ---------------------------------------------------------
def _verified(model: nn.Module, x: torch.Tensor, allow: tuple[str, ...] = (), **kwargs) -> list[dict]:
    rec = hooks.record(model, x, mode="eval", **kwargs)
    assert all(r["check"] in ("verified", "-", *allow) for r in rec.rows), [(r["name"], r["check"], r["note"])
                                                                             for r in rec.rows]
    return rec.rows


def test_post_norm_block_reads_the_stream_before_each_norm():
    """LN(x + attn(x)), LN(x + mlp(x)): two taps; each stream is the sum before its norm (after it, avg_var would
    be ~1 whatever the block does); the second shortcut is the first norm's output."""
    torch.manual_seed(0)
    model = Chain(PostNormToy(), PostNormToy()).eval()
    taps = find_taps(model)
    block = taps[1:3]
    assert [t.output for t in block] == [Site("blocks.0.norm1", "input"), Site("blocks.0.norm2", "input")]
    assert block[1].shortcut == Site("blocks.0.norm1") and all("post-norm" in t.stream for t in block)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)) * 3
    rows = _verified(model, x)
    with torch.no_grad():
        first = x + model.blocks[0].attn(x)
    assert math.isclose(rows[1]["avg_var"], direct_stats(first, 2)[1], rel_tol=1e-5)
    assert rows[1]["stream"] == block[0].stream


def test_addition_into_a_second_argument():
    """cls = block(x, cls): the shortcut is the block's second argument, read as such."""
    torch.manual_seed(0)
    model = TwoStreams().eval()
    taps = find_taps(model)
    assert [t.shortcut for t in taps[1:]] == [Site("blocks.0", "input", 1), Site("blocks.1", "input", 1)]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    rows = _verified(model, x, allow=("unchecked",))  # the branch (a mean, no module's output) is output - shortcut
    values = capture_sites(model, {Site("blocks.1", "input", 1), Site("blocks.1")}, x)
    assert math.isclose(rows[2]["avg_var"], direct_stats(values[Site("blocks.1")], 2)[1], rel_tol=1e-5)


def test_a_scale_module_on_the_shortcut_is_transparent():
    """res_scale(x) + ls(mixer(x)): the branch is mixer's output (before ls), the shortcut res_scale's output."""
    torch.manual_seed(0)
    model = Chain(ResScaleToy(), ResScaleToy()).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.mixer") and taps[1].shortcut == Site("blocks.0.res_scale")
    _verified(model, image(size=8, chans=4))


def test_a_transposed_branch_is_read_before_its_scale_on_its_own_axis():
    """x + ls * linear_tokens(x^T)^T: read at linear_tokens (before ls), whose output is (B, C, N): its channels
    are on axis 1 there, not on the last axis a Linear's type would suggest (those are tokens)."""
    torch.manual_seed(0)
    model = Chain(TokenMixToy(), TokenMixToy(), stem=nn.Linear(4, 4)).eval()
    taps = find_taps(model)
    assert taps[1].residual == Site("blocks.0.linear_tokens") and taps[1].residual_transforms == (("transpose",
                                                                                                    (1, 2)),)
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    rows = _verified(model, x)
    with torch.no_grad():
        stem = model.stem(x)
        branch = model.blocks[0].linear_tokens(stem.transpose(1, 2))  # (B, C, N)
    assert math.isclose(rows[1]["res_avg_var"], direct_stats(branch, 1)[1], rel_tol=1e-5)


def test_reshapes_with_sizes_from_the_shape_are_transparent():
    """y = x.reshape(b, h*w, c); y + mlp(norm(y)); y.view(b, h, w, c): the sizes come from x.shape, and the view
    after the addition keeps the element order (the identity is checked through it). The first block's output
    (B, H, W, C) is taken by no layer as it is (the next block reshapes it first), so its channel axis is unproven
    and the tap is refused, saying how to name it; with --channel-dim every tap is verified."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(ReshapeToy(), ReshapeToy()), nn.LayerNorm(4)).eval()
    taps = find_taps(model)
    assert len(taps) == 3 and taps[1].residual == Site("1.0.mlp")
    x = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(1))
    rows = hooks.record(model, x, mode="eval").rows
    assert rows[1]["check"] == "refused" and "--channel-dim '1.0=AXIS'" in rows[1]["note"]
    assert math.isnan(rows[1]["avg_var"]) and rows[2]["check"] == "verified"
    named = _verified(model, x, channel_dim=["1.0=-1"])
    assert [r["axis"] for r in named] == [3, 3, 3]


def test_nested_additions_get_their_own_taps_in_forward_order():
    torch.manual_seed(0)
    model = Chain(NestedToy(), NestedToy()).eval()
    taps = find_taps(model)
    assert [t.name for t in taps[1:]] == ["blocks.0.token_mixer", "blocks.0", "blocks.1.token_mixer", "blocks.1"]
    assert "nested in blocks.0" in taps[1].note and taps[1].stage == taps[2].stage == 1
    _verified(model, image(size=8, chans=4))


def test_a_head_after_the_last_addition_is_not_the_stream():
    """y = x + f(x); return head(pool(y)): no site holds y, so the block is not read as its logits."""
    model = Chain(HeadAfterAddToy()).eval()
    with pytest.raises(SppError, match="no residual block found"):
        find_taps(model)


# ---- optional shortcut arguments, embeddings --------------------------------------------------------------------


class _OptionalShortcut(nn.Module):
    """DLA's block: ``forward(x, shortcut=None)`` adds ``shortcut`` when given, else ``x`` (``default_double``:
    else ``2 * x``, which is not the block's first input)."""

    def __init__(self, c: int = 4, default_double: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.default_double = default_double

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = 2 * x if self.default_double else x
        return shortcut + self.conv(x)


def test_an_optional_shortcut_left_out_is_checked_against_the_first_input():
    """Traced with ``shortcut`` open, the tap's shortcut is that argument; called without it, the identity is
    checked on the block's first input instead: true for ``x`` (verified, numbers equal float64 of the output),
    false for ``2 * x`` (refused, NaN), never printed unchecked."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = Chain(_OptionalShortcut(), _OptionalShortcut()).eval()
    rec = hooks.record(model, x, mode="eval", blocks=["blocks.*"])
    assert [r["check"] for r in rec.rows[1:]] == ["verified", "verified"]
    with torch.no_grad():
        out = model.blocks[0](model.stem(x))
    assert rec.rows[1]["avg_var"] == pytest.approx(direct_stats(out, 1)[1], rel=1e-5)
    doubled = Chain(_OptionalShortcut(default_double=True), _OptionalShortcut(default_double=True)).eval()
    rec = hooks.record(doubled, x, mode="eval", blocks=["blocks.*"])
    assert all(r["check"] == "refused" and math.isnan(r["avg_var"]) for r in rec.rows[1:])
    assert "residual identity fails" in rec.rows[1]["note"]


class TokenEmbeddings(nn.Module):
    """HF-style embeddings: word + position lookups, ``inputs_embeds`` optional (None: looked up from ids)."""

    def __init__(self, vocab: int = 16, width: int = 8, length: int = 5):
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.position = nn.Embedding(length, width)

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word(input_ids)
        positions = input_ids.ne(0).long().cumsum(1) - 1  # MPNet / RoBERTa: positions from the ids (padding 0)
        return inputs_embeds + self.position(positions.clamp(min=0))


def test_embedding_modules_are_never_blocks():
    """An embedding sum (word + position) is the stream's start, not a residual block: not claimed, though its
    ``inputs_embeds`` argument plus a lookup of the ids looks like shortcut + branch to a trace (the same module
    under another class name is claimed)."""
    assert discovery.traced_residual("embed", TokenEmbeddings()) is None

    class Lookup(TokenEmbeddings):
        pass

    assert discovery.traced_residual("embed", Lookup()) is not None


class _PoolAttention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)

    def forward(self, u):
        return self.proj(self.norm(u)).mean(dim=1, keepdim=True)


class _ClassAttention(nn.Module):
    """CaiT's class-attention block: ``forward(x, x_cls)`` adds into its second argument."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.attn = _PoolAttention(c)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Linear(c, c)

    def forward(self, x, x_cls):
        x_cls = x_cls + self.attn(torch.cat((x_cls, x), dim=1))
        return x_cls + self.mlp(self.norm2(x_cls))


class _ClassTokenModel(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.blocks = nn.ModuleList([_ClassAttention(c), _ClassAttention(c)])

    def forward(self, x):
        x = self.embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # the first block's shortcut: no layer made it
        for blk in self.blocks:
            cls = blk(x, cls)
        return cls


def test_a_shortcut_with_no_axis_evidence_is_still_checked():
    """The first class-attention block adds into an expanded parameter (no layer produced it, so it has no axis
    evidence of its own; the stream it makes is proven by the LayerNorm reading it): the identity is still checked
    on it and holds, as for every other addition (verified); the number equals float64 statistics of the
    captured sum on the last axis."""
    torch.manual_seed(0)
    model = _ClassTokenModel().eval()
    x = torch.randn(3, 5, 8)
    rec = hooks.record(model, x, mode="eval", blocks=["blocks.*"])
    first = next(r for r in rec.rows if r["output_site"] == "blocks.0.norm2:input")
    assert first["check"] == "verified", first["note"]
    with torch.no_grad():
        cls = model.cls_token.expand(3, -1, -1)
        stream = cls + model.blocks[0].attn(torch.cat((cls, model.embed(x)), dim=1))
    assert first["avg_var"] == pytest.approx(direct_stats(stream, 2)[1], rel=1e-5)


def test_cait_class_attention_is_verified_where_its_shortcut_is_a_parameter():
    """timm CaiT: the first class-attention block adds into ``cls_token.expand(...)``, which reaches the block
    before any layer has said where its channels are. It was refused as 'identity fails' (the check fell back to
    the block's first input); the shortcut is now kept for the check whatever its axis, and every class-attention
    tap verifies; the stream equals float64 statistics of the captured ``norm2`` input on the last axis."""
    from tests.zoo_models import ZOO

    model, x = next(z for z in ZOO if z.id == "timm/cait_xxs24_224").build()
    model.eval()
    rec = hooks.record(model, x, mode="eval")
    token = [r for r in rec.rows if r["name"].startswith("blocks_token_only.")]
    assert len(token) == 4 and all(r["check"] == "verified" for r in token), [r["note"] for r in token]
    seen = capture_sites(model, [Site("blocks_token_only.0.norm2", "input")], x)
    stream = seen[Site("blocks_token_only.0.norm2", "input")]
    assert token[0]["avg_var"] == pytest.approx(direct_stats(stream, 2)[1], rel=1e-5)

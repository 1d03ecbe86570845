"""The reference transformers (Pre-LN, Post-LN, NF) against their derived signal propagation at init.

Theory: ``spp.models.transformer_theory`` (a token-covariance recursion, exact at infinite width). The measured
tolerances below are three standard deviations of the per-seed spread measured over 10 seeds at the tests' size
(width 128, 8 layers, 32 sequences of 16 tokens) plus the mean offset seen there, with the reason for the spread.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

import spp.hooks
from spp.errors import SppError
from spp.models import TRANSFORMER_DEPTHS, create_model, get_entry, list_models, nearest_depth, reference_families
from spp.models.activations import gaussian_moments
from spp.models.transformer import POST_NORM_STREAM, nf_transformer, postln_transformer, preln_transformer
from spp.models.transformer import transformer_taps as taps_of
from spp.models.transformer_theory import (
    Kernel,
    activation_kernel,
    nf_theory,
    postln_theory,
    preln_theory,
    uniform_attention,
)
from tests.helpers import assert_close
from tests.helpers import capture_sites as capture
from tests.helpers import direct_stats as channel_stats

WIDTH, DEPTH, SEQ, BATCH = 128, 8, 16, 32
FACTORIES = {"preln": preln_transformer, "postln": postln_transformer, "nf": nf_transformer}
ALPHA = 0.2


def build(family: str, *, width=WIDTH, depth=DEPTH, seq=SEQ, seed=0, **kw):
    torch.manual_seed(seed)
    return FACTORIES[family](depth, width=width, heads=4, seq_len=seq, **kw)


def tokens(batch=BATCH, seq=SEQ, seed=100, vocab=256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def harmonic(n: int) -> float:
    return sum(1.0 / k for k in range(1, n + 1))


_RECORDS: dict[str, tuple] = {}


def recorded(family: str):
    """(model, frame) of the tests' standard size, recorded once per family (eval mode)."""
    if family not in _RECORDS:
        model = build(family)
        _RECORDS[family] = (model, spp.hooks.record(model, tokens(), taps=taps_of(model), mode="eval").to_frame())
    return _RECORDS[family]


def ratios(family: str, column: str) -> list[float]:
    """Measured / theory at the tests' batch size, one per tap (stem excluded)."""
    model, df = recorded(family)
    index = {"avg_var": 0, "avg_sq_mean": 1, "res_avg_var": 2}[column]
    return [float(df[column][i]) / t.at_batch(BATCH)[index] for i, t in enumerate(model.spp_theory, start=1)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---- registry --------------------------------------------------------------------------------------------------
def test_registry_has_transformer_families_with_a_layer_table():
    names = list_models(kind="transformer")
    assert reference_families("transformer") == ("preln_transformer", "postln_transformer", "nf_transformer")
    assert names == [f"{f}{d}" for f in reference_families("transformer") for d in TRANSFORMER_DEPTHS]
    entry = get_entry("postln_transformer48")
    assert entry.family.kind == "transformer" and entry.layers == (48,) and "48 layers" in entry.description
    # Nearest depth counts layers; the deeper one on a tie (9 is 3 from 6 and from 12).
    assert [nearest_depth(n, "transformer") for n in (1, 9, 17, 30, 36, 1000)] == [6, 12, 12, 24, 48, 96]
    assert nearest_depth(17) == 50  # the ResNet table is unchanged
    with pytest.raises(SppError, match="unknown reference kind"):
        nearest_depth(12, "vit")
    model = create_model("nf_transformer6", width=64, seq_len=8)
    assert len(model.blocks) == 6 and model.width == 64
    with pytest.raises(SppError, match="bad option"):
        create_model("preln_transformer6", depth_multiplier=2)
    with pytest.raises(SppError, match="divisible by heads"):
        create_model("preln_transformer6", width=66, heads=4)


def test_listing_transformer_references_does_not_import_torch():
    code = ("import sys; from spp.models import list_models, get_entry; "
            "names = list_models(kind='transformer'); [get_entry(n).description for n in names]; "
            "print(len(names), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["15", "False"], out.stderr


# ---- taps ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_two_taps_per_layer_at_sites_that_exist(family):
    model = build(family, width=32, depth=3, seq=8)
    taps = taps_of(model)
    modules = dict(model.named_modules())
    assert [t.name for t in taps] == ["stem"] + [f"blocks.{i}.{b}" for i in range(3) for b in ("attn", "mlp")]
    assert taps[0].output.module == "blocks.0" and taps[0].output.kind == "input" and taps[0].expected_var == 1.0
    for tap in taps[1:]:
        assert tap.branch == tap.name.rsplit(".", 1)[1] and tap.residual.module == tap.name
        assert tap.stage == 1 and tap.channel_dim == -1 and tap.layer == int(tap.module.split(".")[1]) + 1
        assert {tap.output.module, tap.shortcut.module, tap.residual.module} <= set(modules)
        assert tap.stream == (POST_NORM_STREAM if family == "postln" else "")
    assert [t.expected_var for t in taps[1:]] == [t.var for t in model.spp_theory]


# ---- what the recorder reads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_stream_is_shortcut_plus_scaled_branch_on_captured_tensors(family):
    """output == shortcut + scale * branch at every tap (scale = alpha for NF, 1 otherwise), on tensors our own
    hooks capture: the sites name the addition they claim to."""
    model = build(family, width=64, depth=3, seq=16)
    taps = taps_of(model)[1:]
    sites = {s for t in taps for s in (t.output, t.shortcut, t.residual)}
    seen = capture(model, sites, tokens(batch=4))
    scale = ALPHA if family == "nf" else 1.0
    for t in taps:
        out, rebuilt = seen[t.output], seen[t.shortcut] + scale * seen[t.residual]
        assert torch.allclose(out, rebuilt, rtol=0, atol=1e-5 * float(out.abs().max())), t.name
        assert not torch.equal(seen[t.output], seen[t.shortcut]), f"{t.name}: the branch adds nothing"


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_recorded_statistics_equal_float64_on_captured_tensors(family):
    model = build(family, width=64, depth=3, seq=16)
    x = tokens(batch=4)
    taps = taps_of(model)
    df = spp.hooks.record(model, x, taps=taps, mode="eval").to_frame()
    seen = capture(model, {s for t in taps for s in (t.output, t.residual) if s is not None}, x)
    for i, t in enumerate(taps):
        sq, var = channel_stats(seen[t.output], -1)
        assert_close(df["avg_var"][i], var, 1e-5, f"{t.name} var")
        assert abs(df["avg_sq_mean"][i] - sq) <= 1e-6 * var, f"{t.name} sq mean"
        if t.residual is not None:
            assert_close(df["res_avg_var"][i], channel_stats(seen[t.residual], -1)[1], 1e-5, f"{t.name} branch")


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_train_and_eval_records_are_identical(family):
    """No BatchNorm and no dropout: the mode changes nothing, bit for bit."""
    model = build(family, width=32, depth=2, seq=8)
    x = tokens(batch=4, seq=8)
    frames = [spp.hooks.record(model, x, taps=taps_of(model), mode=m).to_frame() for m in ("eval", "train")]
    for col in ("avg_sq_mean", "avg_var", "res_avg_var"):
        assert frames[0][col].equals(frames[1][col]), col


# ---- inputs ----------------------------------------------------------------------------------------------------
def test_token_ids_and_embeddings_are_the_same_input():
    """Ids go through the table; the table's rows passed as floats are the same stem, so the same logits. Every id
    once (a permutation of the vocabulary) reads the table's own statistics: mean 0, variance 1 per channel, exactly,
    since each channel is standardised over the vocabulary."""
    model = build("preln", width=32, depth=2, seq=64)
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(0)).view(4, 64)
    with torch.no_grad():
        assert torch.equal(model(ids), model(model.embed(ids)))
    df = spp.hooks.record(model, ids, taps=taps_of(model)).to_frame()
    assert_close(df["avg_var"][0], 1.0, 1e-6, "stem variance")
    assert df["avg_sq_mean"][0] < 1e-12
    gauss = spp.hooks.record(model, torch.randn(4, 64, 32), taps=taps_of(model)).to_frame()
    assert len(gauss) == len(df) == 5


def test_bad_inputs_are_refused_with_what_to_do():
    model = build("nf", width=32, depth=1, seq=8)
    cases = [
        (tokens(batch=2, seq=9), "built for sequence length 8.*seq_len=9"),
        (torch.randn(2, 8, 16), r"embeddings \(batch, seq, 32\)"),
        (torch.full((2, 8), 256), r"token ids must lie in \[0, 256\)"),
        (torch.zeros(2, 8, 1, dtype=torch.long), r"token ids of shape \(batch, seq\)"),
    ]
    for x, message in cases:
        with pytest.raises(SppError, match=message):
            model(x)


def test_deterministic_given_the_seed():
    a, b = build("nf", width=32, depth=2, seq=8, seed=3), build("nf", width=32, depth=2, seq=8, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.embed.weight, build("nf", width=32, depth=2, seq=8, seed=4).embed.weight)


# ---- theory: closed forms --------------------------------------------------------------------------------------
def test_uniform_attention_closed_forms():
    """Independent unit tokens through uniform causal attention: position i averages i + 1 of them, variance
    1 / (i + 1), mean over positions H_L / L; the part a sequence shares is mean(C C^T) =
    sum_{j<L} (H_L - H_j)^2 / L^2 (column j of C sums to H_L - H_j).
    Non-causal: every output is the sequence mean, variance 1 / L, all of it shared."""
    L = 16
    var, sq, common = Kernel.independent_tokens(L).averaged(causal=True).stats()
    assert_close(var, harmonic(L) / L, 1e-12, "causal variance")
    assert_close(common, sum((harmonic(L) - harmonic(j)) ** 2 for j in range(L)) / L**2, 1e-12, "shared")
    assert sq == 0.0
    var, _, common = Kernel.independent_tokens(L).averaged(causal=False).stats()
    assert_close(var, 1 / L, 1e-12, "non-causal")
    assert_close(common, 1 / L, 1e-12, "non-causal shared")
    # The cumulative-sum form equals C K C^T for any kernel.
    a = torch.randn(L, L, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = Kernel(a @ a.T, a @ a.T / 2)
    for causal in (True, False):
        c = uniform_attention(L, causal)
        assert torch.allclose(k.averaged(causal).same, c @ k.same @ c.T, atol=1e-12)
        assert torch.allclose(k.averaged(causal).cross, c @ k.cross @ c.T, atol=1e-12)


def test_activation_kernel_matches_closed_forms():
    """relu: the arc-cosine kernel (sqrt(1 - rho^2) + (pi - arccos rho) rho) / (2 pi); any g: F(0) = E[g]^2
    (independent inputs), F(1) = E[g^2]."""
    rho, f = activation_kernel("relu")
    exact = (torch.sqrt(1 - rho**2) + (math.pi - torch.arccos(rho)) * rho) / (2 * math.pi)
    assert float((f - exact).abs().max()) < 5e-5
    for name in ("gelu", "tanh", "silu"):
        rho, f = activation_kernel(name)
        m1, m2 = gaussian_moments(name)
        mid = len(rho) // 2
        assert float(rho[mid]) == 0.0
        assert abs(float(f[mid]) - m1 * m1) < 1e-9 and abs(float(f[-1]) - m2) < 1e-12, name


def test_theory_identities():
    """Pre-LN: every MLP adds exactly 1 to the stream's second moment (He gain on a unit-RMS input) and the first
    branches are H_L / L (attention) and (Var g, E[g]^2) / E[g^2] (MLP: 0.8129 / 0.1871 for gelu). Post-LN: the
    MLP's pre-norm sum has second moment exactly 2 (a unit-RMS stream plus a unit branch). NF: 1 + k alpha^2."""
    L, depth = 32, 6
    m1, m2 = gaussian_moments("gelu")
    pre = preln_theory(depth, seq_len=L, causal=True, activation="gelu")
    assert_close(pre[0].branch_var, harmonic(L) / L, 1e-12, "first attention branch")
    assert_close(pre[1].branch_var, (m2 - m1 * m1) / m2, 1e-6, "first MLP branch variance")
    assert_close(pre[1].branch_sq, m1 * m1 / m2, 1e-6, "first MLP branch squared mean")
    for before, mlp in zip(pre[0::2], pre[1::2], strict=True):
        assert_close(mlp.var + mlp.sq - before.var - before.sq, 1.0, 1e-6, f"layer {mlp.layer} MLP second moment")
    assert all(b.var > a.var for a, b in itertools.pairwise(pre)), "Pre-LN grows"
    post = postln_theory(depth, seq_len=L, causal=True, activation="gelu")
    for mlp in post[1::2]:
        assert_close(mlp.var + mlp.sq, 2.0, 1e-6, f"layer {mlp.layer} post-norm MLP sum")
    assert max(t.var + t.sq for t in post) < 2.0 + 1e-6, "Post-LN is bounded"
    nf = nf_theory(depth, seq_len=L, alpha=ALPHA)
    assert [t.var for t in nf] == pytest.approx([1 + k * ALPHA**2 for k in range(1, 2 * depth + 1)], abs=1e-12)


# ---- theory against measurement --------------------------------------------------------------------------------
def test_preln_follows_the_recursion():
    """Per tap, the stream variance within 8% (10 seeds: worst 5.2%, sd <= 2.6%: each layer's random weights);
    averaged over taps within 4% (sd 1.3%). Branches averaged over layers: attention within 8% (sd 2.6%; its
    variance is mostly the part a sequence shares, estimated from 32 sequences), MLP within 6% (sd 2.0%). The
    squared mean averaged over taps within 30% (mean ratio 0.96, sd 0.08): it is the squared norm of one random mean
    direction per layer, relative spread sqrt(2 / width) = 12.5%."""
    _, df = recorded("preln")
    var, sq, res = ratios("preln", "avg_var"), ratios("preln", "avg_sq_mean"), ratios("preln", "res_avg_var")
    assert all(abs(r - 1) < 0.08 for r in var), var
    assert abs(mean(var) - 1) < 0.04
    assert abs(mean(res[0::2]) - 1) < 0.08 and abs(mean(res[1::2]) - 1) < 0.06, res
    assert abs(mean(sq) - 1) < 0.30, sq
    assert df["avg_var"].iloc[-1] > 6 * df["avg_var"][1], "Pre-LN grows with depth"


def test_postln_follows_the_recursion():
    """The first layer (no drift yet) within 3% per tap (sd <= 1%). Deeper, the stream is mostly a shared mean
    direction whose squared norm fluctuates with the weights (sqrt(2 / width) per layer, weakly restored), so a
    single model wanders around the line: averaged over taps, the variance within 20% (sd 6.4%), the second
    moment var + sq within 6% (sd 1.9%), the branches within 18% (sd 5.9%)."""
    model, df = recorded("postln")
    var, res = ratios("postln", "avg_var"), ratios("postln", "res_avg_var")
    assert abs(var[0] - 1) < 0.03 and abs(var[1] - 1) < 0.03, var[:2]
    assert abs(mean(var) - 1) < 0.20 and abs(mean(res) - 1) < 0.18
    second = [(df["avg_var"][i] + df["avg_sq_mean"][i]) / (t.var + t.sq) for i, t in enumerate(model.spp_theory, 1)]
    assert abs(mean(second) - 1) < 0.06, second
    assert max(df["avg_var"][1:]) < 2.0, "Post-LN stays flat"


def test_nf_variance_is_one_plus_k_alpha_squared():
    """Per tap within 7% of 1 + k alpha^2 (10 seeds: worst 5.8%, sd 1.9%), branches within 10% of 1 (worst 7.1%).
    The squared mean is the finite sample's: the tokens are independent, so the per-channel mean of 32 x 16 of
    them has E[mean^2] = var / 512, within 40% (it is a chi-square over 128 channels: 12.5% relative spread)."""
    model, df = recorded("nf")
    assert all(abs(r - 1) < 0.07 for r in ratios("nf", "avg_var"))
    assert all(abs(r - 1) < 0.10 for r in ratios("nf", "res_avg_var"))
    for i, t in enumerate(model.spp_theory, start=1):
        assert_close(df["expected_var"][i], 1 + i * ALPHA**2, 1e-12, "theory column")
        assert_close(df["avg_sq_mean"][i], t.var / (BATCH * SEQ), 0.40, f"{t.layer} {t.branch} squared mean")


def test_nf_beta_bookkeeping():
    """beta = sqrt(expected variance) entering each branch: 1 + (2l) alpha^2 before layer l's attention and
    1 + (2l + 1) alpha^2 before its MLP (0-based l); the head sees x / sqrt(1 + 2 L alpha^2)."""
    model = build("nf", width=32, depth=4, seq=8)
    for i, layer in enumerate(model.blocks):
        assert_close(1 / layer.scale1.factor, math.sqrt(1 + 2 * i * ALPHA**2), 1e-12, "beta attn")
        assert_close(1 / layer.scale2.factor, math.sqrt(1 + (2 * i + 1) * ALPHA**2), 1e-12, "beta mlp")
        assert layer.alpha == ALPHA
    assert_close(1 / model.final.factor, math.sqrt(1 + 8 * ALPHA**2), 1e-12, "final")


def test_nf_attention_is_the_identity_over_positions_at_init():
    """Shaped attention softmax - C + I with a zero query: the branch is the out projection of the values, token by
    token, so permuting the sequence permutes the branch (a mixing of positions would not commute)."""
    model = build("nf", width=32, depth=1, seq=8, causal=True)
    attn = model.blocks[0].attn
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-5)
        assert torch.allclose(attn(x), attn.proj(attn.v(x)), atol=1e-5)


def test_keyword_inputs_are_the_positional_ones():
    """spp's token and embedding inputs are HuggingFace-style dicts ({"input_ids": ...} / {"inputs_embeds": ...}):
    a reference transformer fed either gives exactly its positional output; two inputs at once are refused."""
    torch.manual_seed(0)
    model = create_model("preln_transformer6", width=32, seq_len=8).eval()
    ids = torch.randint(0, model.vocab_size, (2, 8))
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids), model(ids))
        assert torch.equal(model(inputs_embeds=x), model(x))
        with pytest.raises(SppError, match="takes one input"):
            model(ids, inputs_embeds=x)

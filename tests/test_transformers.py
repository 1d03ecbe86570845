"""HuggingFace transformers in spp: discovery rules, ``hf:`` loading, token / embedding / text inputs.

Every tap is checked on tensors captured with this file's own hooks (not spp's): each site fires once per forward,
and the stream after the addition equals shortcut + scale * branch. The model computes that sum in float32; the
reference recomputes it in float64 from the same float32 operands, so the two differ only by the float32 rounding
of one addition: at most 2^-24 * |sum| per element, bounded here by 1e-6 * max|sum|.
Models are tiny (2 layers, width 64) and randomly initialised; nothing touches the network.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import spp.discovery as discovery  # noqa: E402
from spp import hooks  # noqa: E402
from spp.errors import SppError  # noqa: E402
from spp.hf import HFInfo, load_hf, parse_value  # noqa: E402
from spp.inputs import (  # noqa: E402
    EmbeddingInput,
    TensorInput,
    TextInput,
    TokenInput,
    check_seq_len,
    check_token_ids,
)
from spp.rules.transformers import TRANSFORMER_RULES  # noqa: E402
from spp.taps import Difference, Site, Tap  # noqa: E402

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
GQA = {**SMALL, "num_key_value_heads": 2}  # grouped-query attention: 2 key/value heads for 4 query heads
VOCAB = 96
ROUNDING = 1e-6  # float32 rounding of one addition, relative to the largest |sum| (see the module docstring)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_rules():
    """The transformers rules are in spp.discovery.DEFAULT_RULES (a fixture kept so the tests say they need them)."""
    assert all(any(r.match is fn for r in discovery.DEFAULT_RULES) for _, fn in TRANSFORMER_RULES)


def build(model_type: str, **overrides) -> nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def small(model_type: str, **overrides) -> nn.Module:
    return build(model_type, **{**SMALL, **overrides})


def token_ids(n: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": ids}
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:
        inputs["decoder_input_ids"] = ids
    return inputs


def claim(model: nn.Module) -> list[Tap]:
    """The transformers rules alone, walked like find_taps: outermost claim wins."""
    taps: list[Tap] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        for _label, rule in TRANSFORMER_RULES:
            found = rule(name, module)
            if found:
                taps.extend(found)
                claimed.append(name)
                break
    return taps


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, dict):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


@torch.no_grad()
def capture(model: nn.Module, sites, inputs: dict) -> dict[Site, list[torch.Tensor]]:
    """Every tensor each site sees in one forward (clones), reading ``Site.arg`` by position or parameter name."""
    modules = dict(model.named_modules())
    seen: dict[Site, list[torch.Tensor]] = {s: [] for s in set(sites)}
    handles = []
    for site in seen:
        module = modules[site.module]
        if site.kind == "input":
            names = list(inspect.signature(module.forward).parameters)

            def pre(m, args, kwargs, site=site, names=names):
                if isinstance(site.arg, int) and site.arg < len(args):
                    x = args[site.arg]
                else:
                    x = kwargs[site.arg if isinstance(site.arg, str) else names[site.arg]]
                seen[site].append(x.detach().clone())

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(m, args, output, site=site):
                seen[site].append(first_tensor(output).detach().clone())

            handles.append(module.register_forward_hook(post))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def sites_of(taps: list[Tap]) -> set[Site]:
    found: set[Site] = set()
    for t in taps:
        found.add(t.output)
        if t.shortcut is not None:
            found.add(t.shortcut)
        if isinstance(t.residual, Site):
            found.add(t.residual)
        elif isinstance(t.residual, Difference):
            found.update((t.residual.minuend, t.residual.subtrahend))
    return found


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def assert_sums(taps: list[Tap], values: dict[Site, list[torch.Tensor]], scale: float = 1.0) -> None:
    """Each site fired once; output == shortcut + scale * branch for every tap read at a module (float64)."""
    for site, seen in values.items():
        assert len(seen) == 1, f"{site} fired {len(seen)} times"
    for tap in taps:
        if not isinstance(tap.residual, Site):
            continue
        out = channels_last(values[tap.output][0])
        short = channels_last(values[tap.shortcut][0])
        branch = channels_last(values[tap.residual][0])
        err = (out - (short + scale * branch)).abs().max().item()
        assert err <= ROUNDING * out.abs().max().item(), f"{tap.name}: stream != shortcut + branch ({err:.2e})"
        assert branch.abs().max() > 0, f"{tap.name}: the branch is zero, the check would prove nothing"


# ---- discovery: every tap is shortcut + branch ------------------------------------------------------------

SEQUENTIAL = [
    # (model type, config overrides, taps per layer, what the branch site must be)
    ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4}, 2, {"attn": "attn", "mlp": "mlp"}),
    ("llama", SMALL, 2, {"attn": "self_attn", "mlp": "mlp"}),
    ("mistral", GQA, 2, {"attn": "self_attn", "mlp": "mlp"}),
    ("qwen2", GQA, 2, {"attn": "self_attn", "mlp": "mlp"}),
    ("qwen3", GQA, 2, {"attn": "self_attn", "mlp": "mlp"}),
    ("mixtral", {**GQA, "num_local_experts": 4}, 2, {"attn": "self_attn", "mlp": "mlp"}),
    ("bert", SMALL, 2, {"attn": "attention.output.dense", "mlp": "output.dense"}),
    ("roberta", SMALL, 2, {"attn": "attention.output.dense", "mlp": "output.dense"}),
    ("distilbert", {"n_layers": 2, "dim": 64, "n_heads": 4, "hidden_dim": 128}, 2, {"attn": "attention", "mlp": "ffn"}),
    ("gemma2", {**GQA, "head_dim": 16}, 2, {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}),
    (
        "gemma3_text",
        {**GQA, "head_dim": 16},
        2,
        {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    ),
    ("opt", {**SMALL, "ffn_dim": 128, "word_embed_proj_dim": 64}, 2, {"attn": "self_attn", "mlp": "fc2"}),
    (
        "opt",
        {**SMALL, "ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": False},
        2,
        {"attn": "self_attn", "mlp": "fc2"},
    ),
    (
        "bloom",
        {"n_layer": 2, "hidden_size": 64, "n_head": 4},
        2,
        {"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"},
    ),
    ("gpt_neox", {**SMALL, "use_parallel_residual": False}, 2, {"attn": "attention", "mlp": "mlp"}),
    (
        "falcon",
        {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "parallel_attn": False},
        2,
        {"attn": "self_attention", "mlp": "mlp"},
    ),
]


@pytest.mark.parametrize(
    ("model_type", "overrides", "per_layer", "branches"),
    SEQUENTIAL,
    ids=[f"{m}-{i}" for i, (m, *_rest) in enumerate(SEQUENTIAL)],
)
def test_sequential_layers_are_shortcut_plus_branch(model_type, overrides, per_layer, branches):
    """Two residual additions per layer (attention, then MLP), each read before the add: stream == shortcut +
    branch on real tensors; the branch is the module the family's forward adds (sandwich norms: the norm on it)."""
    model = build(model_type, **overrides)
    taps = claim(model)
    assert len(taps) == per_layer * 2
    assert [t.branch for t in taps] == ["attn", "mlp", "attn", "mlp"]
    for tap in taps:
        assert tap.channel_dim == -1
        assert isinstance(tap.residual, Site) and tap.residual.module == f"{tap.module}.{branches[tap.branch]}"
    assert_sums(taps, capture(model, sites_of(taps), model_inputs(model, token_ids())))


def test_bert_reads_the_second_argument_and_the_layernorm_input():
    """BERT adds inside BertSelfOutput(hidden, input_tensor): the shortcut is argument 1, the stream the LayerNorm's
    input (post-norm), the branch the dense output before dropout."""
    taps = claim(small("bert"))
    attn, mlp = taps[0], taps[1]
    assert attn.shortcut == Site("encoder.layer.0.attention.output", "input", 1)
    assert attn.output == Site("encoder.layer.0.attention.output.LayerNorm", "input")
    assert attn.residual == Site("encoder.layer.0.attention.output.dense")
    assert mlp.shortcut == Site("encoder.layer.0.output", "input", 1)
    assert all("post-norm" in t.stream and "LayerNorm input" in t.stream for t in taps)


def test_t5_encoder_and_decoder_sublayers():
    """T5: each block's sub-layers add one branch each: 2 taps per encoder block, 3 per decoder block (self-,
    cross-attention, feed-forward), each read inside its sub-layer."""
    model = build("t5", num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16)
    taps = claim(model)
    assert len(taps) == 2 * 2 + 3 * 2
    assert [t.branch for t in taps] == ["attn", "mlp"] * 2 + ["attn", "cross_attn", "mlp"] * 2
    assert taps[5].residual == Site("decoder.block.0.layer.1.EncDecAttention")
    assert taps[5].shortcut == Site("decoder.block.0.layer.1", "input")
    assert_sums(taps, capture(model, sites_of(taps), model_inputs(model, token_ids())))


def test_encoder_decoder_cross_attention_bart():
    """BART's decoder layer runs cross-attention only when encoder states are passed (BartModel always does):
    the rule takes that path and says so; post-norm: the streams are the LayerNorm inputs."""
    model = build(
        "bart",
        encoder_layers=2,
        decoder_layers=2,
        d_model=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
    )
    taps = claim(model)
    assert [t.branch for t in taps] == ["attn", "mlp"] * 2 + ["attn", "cross_attn", "mlp"] * 2
    cross = taps[5]
    assert "`encoder_hidden_states is not None`" in cross.note
    assert cross.output == Site("decoder.layers.0.encoder_attn_layer_norm", "input")
    assert_sums(taps, capture(model, sites_of(taps), model_inputs(model, token_ids())))


def test_granite_branch_is_read_before_its_multiplier():
    """Granite adds branch * residual_multiplier: the tap reads the branch before the factor, the note names it,
    and stream == shortcut + 0.25 * branch."""
    model = small("granite", residual_multiplier=0.25)
    taps = claim(model)
    assert len(taps) == 4
    assert all("0.25" in t.note for t in taps)
    assert_sums(taps, capture(model, sites_of(taps), model_inputs(model, token_ids())), scale=0.25)


def test_layer_scale_branch_is_read_before_the_scale():
    """BEiT multiplies the branch by a learned vector lambda before the add (and calls one drop_path module for
    both branches): the tap reads the attention / MLP output before lambda; stream == shortcut + lambda * branch."""
    config = transformers.AutoConfig.for_model(
        "beit", **SMALL, image_size=16, patch_size=8, layer_scale_init_value=0.5, use_mask_token=False
    )
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():
        for layer in model.layers:  # distinct, non-constant factors so a missed scale cannot pass
            layer.lambda_1.uniform_(0.2, 2.0)
            layer.lambda_2.uniform_(0.2, 2.0)
    taps = claim(model)
    assert [t.residual.module for t in taps[:2]] == ["layers.0.attention", "layers.0.mlp"]
    assert all("self.lambda_" in t.note for t in taps)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    values = capture(model, sites_of(taps), {"pixel_values": pixels})
    for tap in taps:
        layer = model.get_submodule(tap.module)
        factor = (layer.lambda_1 if tap.branch == "attn" else layer.lambda_2).detach().double()
        out, short = channels_last(values[tap.output][0]), channels_last(values[tap.shortcut][0])
        branch = channels_last(values[tap.residual][0])
        assert (out - (short + factor * branch)).abs().max().item() <= 2 * ROUNDING * out.abs().max().item()


PARALLEL = [
    ("gpt_neox", {**SMALL, "use_parallel_residual": True}, "attention", "mlp"),
    ("phi", SMALL, "self_attn", "mlp"),
    ("falcon", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}, "self_attention", "mlp"),
    ("gptj", {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8}, "attn", "mlp"),
]


@pytest.mark.parametrize(("model_type", "overrides", "attn", "mlp"), PARALLEL, ids=[p[0] for p in PARALLEL])
def test_parallel_layers_read_attn_plus_mlp_as_output_minus_input(model_type, overrides, attn, mlp):
    """x + attn(ln(x)) + mlp(ln(x)): one tap per layer, branch = output - input, which must equal the sum of the
    attention and MLP outputs captured on those children (dropout off in eval)."""
    model = build(model_type, **overrides)
    taps = claim(model)
    assert len(taps) == 2 and all(t.branch == "attn+mlp" for t in taps)
    layer = taps[0].module
    assert taps[0].residual == Difference(Site(layer), Site(layer, "input"))
    children = [Site(f"{layer}.{attn}"), Site(f"{layer}.{mlp}")]
    values = capture(model, [*sites_of(taps[:1]), *children], model_inputs(model, token_ids()))
    out, inp = channels_last(values[Site(layer)][0]), channels_last(values[Site(layer, "input")][0])
    both = channels_last(values[children[0]][0]) + channels_last(values[children[1]][0])
    assert (out - inp - both).abs().max().item() <= 4 * ROUNDING * out.abs().max().item()


# ---- refusals and non-claims -------------------------------------------------------------------------------


def test_albert_is_refused():
    """ALBERT runs one layer's weights at every depth: a hook would merge all depths into one point."""
    model = build(
        "albert", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, embedding_size=32
    )
    with pytest.raises(SppError, match="shares its layer weights across depth"):
        claim(model)


def test_chunked_feed_forward_is_refused():
    """chunk_size_feed_forward > 0 runs BERT's feed-forward once per chunk: no single tensor per layer."""
    model = small("bert", chunk_size_feed_forward=4)
    with pytest.raises(SppError, match="chunk_size_feed_forward=0"):
        claim(model)


class _Layer(transformers.modeling_layers.GradientCheckpointingLayer):
    """A transformers-style layer built in the test: pre-norm attention and MLP on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)


class _ConditionalBranch(_Layer):
    def forward(self, hidden_states, flag=None):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        if flag is not None and self.training:  # a branch that runs for some calls only, not an optional input
            hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return hidden_states


class _UnreadableSum(_Layer):
    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        normed = nn.functional.layer_norm(hidden_states, (8,))  # the sum reaches no module: no hook can read it
        return hidden_states + self.mlp(normed)


class _Plain(_Layer):
    def forward(self, hidden_states):
        return self.mlp(self.norm2(self.attn(hidden_states)))  # no residual addition


class _Pair(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([layer])


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (_ConditionalBranch(), "run only when `flag is not None and self.training`"),
        (_UnreadableSum(), "held by no module input or output"),
    ],
    ids=["conditional-branch", "unreadable-sum"],
)
def test_residual_layers_spp_cannot_read_are_refused(layer, message):
    """A layer proven residual whose taps would be a guess is refused with the reason and the --blocks way out."""
    with pytest.raises(SppError, match=r"--blocks 'layers\.\*'") as info:
        claim(_Pair(layer))
    assert message in str(info.value)


def test_non_residual_and_non_transformers_modules_are_not_claimed():
    """No addition, no tap; modules from outside transformers are left to the other rules."""
    assert claim(_Pair(_Plain())) == []

    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.mlp = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    assert claim(_Pair(Outside())) == []


# ---- spp's statistics on these taps ------------------------------------------------------------------------


class _Seq2Seq(nn.Module):
    """Feeds one tensor of ids to both halves of an encoder-decoder (the recorder calls model(batch))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, decoder_input_ids=ids)


STATS = [
    ("llama", lambda: small("llama")),
    ("bert", lambda: small("bert")),
    ("gemma2", lambda: build("gemma2", **GQA, head_dim=16)),
    ("gpt_neox-parallel", lambda: small("gpt_neox", use_parallel_residual=True)),
    (
        "t5",
        lambda: _Seq2Seq(build("t5", num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16)),
    ),
]


def reference_stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean over channels of the squared channel mean, mean over channels of the ddof-0 variance), float64,
    channels on the last axis, every other axis pooled."""
    flat = channels_last(x)
    mean = flat.mean(dim=0)
    return float((mean * mean).mean()), float(flat.var(dim=0, unbiased=False).mean())


@pytest.mark.parametrize(("label", "make"), STATS, ids=[s[0] for s in STATS])
def test_spp_statistics_equal_float64_reference(hf_rules, label, make):
    """spp.hooks.record on the discovered taps equals a float64 computation on tensors captured by this file's
    hooks: avg_sq_mean and avg_var of each stream, res_avg_var of each branch (parallel: output - input)."""
    model = make()
    ids = token_ids(2, 8)
    taps = discovery.find_taps(model)
    assert taps[0].name == "stem" and len(taps) > 1
    record = hooks.record(model, ids, mode="eval", taps=taps)
    sites = {t.output for t in taps}
    for tap in taps[1:]:
        if isinstance(tap.residual, Site):
            sites.add(tap.residual)
        elif isinstance(tap.residual, Difference):
            sites.update((tap.residual.minuend, tap.residual.subtrahend))
    inputs = {"ids": ids} if isinstance(model, _Seq2Seq) else {"input_ids": ids}
    values = capture(model, sites, inputs)
    for tap, row in zip(taps, record.rows, strict=True):
        sq, var = reference_stats(values[tap.output][0])
        assert row["avg_sq_mean"] == pytest.approx(sq, rel=1e-5, abs=1e-9), tap.name
        assert row["avg_var"] == pytest.approx(var, rel=1e-5), tap.name
        if isinstance(tap.residual, Site):
            branch = values[tap.residual][0]
        elif isinstance(tap.residual, Difference):
            branch = values[tap.residual.minuend][0].double() - values[tap.residual.subtrahend][0].double()
        else:
            continue
        assert row["res_avg_var"] == pytest.approx(reference_stats(branch)[1], rel=1e-5), tap.name


# ---- inputs --------------------------------------------------------------------------------------------------


def test_token_input_batches_are_reproducible_per_micro_batch():
    """Micro-batch j depends on (seed, j) only: a shard sees exactly the batches one process sees; ids in range."""
    source = TokenInput(vocab_size=VOCAB, seq_len=16, num_samples=10, batch_size=4, seed=3)
    everything = list(source.batches())
    assert [b.shape for b in everything] == [(4, 16), (4, 16), (2, 16)]
    assert torch.equal(next(iter(source.batches([2]))), everything[2])
    ids = torch.cat(everything)
    assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    assert not torch.equal(everything[0], everything[1])
    pair = TokenInput(vocab_size=VOCAB, seq_len=16, num_samples=4, batch_size=4, seed=3, decoder=True).batch(0)
    assert set(pair) == {"input_ids", "decoder_input_ids"} and torch.equal(pair["input_ids"], everything[0])


def test_token_input_is_uniform_over_the_vocabulary():
    """Uniform ids over V values: each id's count over n draws is Binomial(n, 1/V); with n = 96 * 400, the mean
    count is 400 and its standard deviation sqrt(400 * (1 - 1/96)) ~ 20, so every count lies within 400 +- 6 sd."""
    source = TokenInput(vocab_size=VOCAB, seq_len=400, num_samples=96, batch_size=96)
    counts = torch.bincount(source.batch(0).reshape(-1), minlength=VOCAB)
    assert counts.numel() == VOCAB
    assert int(counts.min()) > 400 - 6 * 20 and int(counts.max()) < 400 + 6 * 20


def test_embedding_input_feeds_the_layers():
    """inputs_embeds bypass the embedding table: the first layer's input is exactly x, for Llama and for Gemma too
    (transformers 5 applies Gemma's sqrt(hidden_size) scale inside its embedding module, which x skips)."""
    source = EmbeddingInput(hidden_size=64, seq_len=8, num_samples=2, batch_size=2, std=0.5)
    batch = source.batch(0)
    x = batch["inputs_embeds"]
    assert x.shape == (2, 8, 64)
    for model in (small("llama"), build("gemma", **GQA, head_dim=16)):
        seen = capture(model, [Site("layers.0", "input")], batch)[Site("layers.0", "input")][0]
        assert torch.equal(seen, x)
    gemma = build("gemma", **GQA, head_dim=16)
    ids = token_ids(1, 4)
    looked_up = capture(gemma, [Site("layers.0", "input")], {"input_ids": ids})[Site("layers.0", "input")][0]
    table = gemma.embed_tokens.weight[ids]
    torch.testing.assert_close(looked_up, table * 8.0, rtol=1e-6, atol=0)  # token ids do get sqrt(64) = 8


def test_embedding_input_moments_follow_the_requested_std():
    """Sample mean and variance of 2 * 64 * 64 = 8192 N(0, 0.5^2) draws: mean within 6 * 0.5 / sqrt(8192) ~ 0.033
    of 0, variance within 6 * 0.25 * sqrt(2 / 8192) ~ 0.024 of 0.25."""
    x = EmbeddingInput(hidden_size=64, seq_len=64, num_samples=2, batch_size=2, std=0.5).batch(0)["inputs_embeds"]
    assert abs(float(x.mean())) < 0.033
    assert abs(float(x.var(unbiased=False)) - 0.25) < 0.024


def test_sequence_longer_than_the_position_table_is_refused():
    with pytest.raises(SppError, match="position table holds 1024"):
        TokenInput(vocab_size=VOCAB, seq_len=1025, max_positions=1024)
    check_seq_len(1024, max_positions=1024, where="x")
    check_seq_len(100_000, max_positions=None, where="x")  # rotary models: no table to overrun


def test_token_ids_are_checked_against_the_vocabulary():
    good = torch.tensor([[0, 5, VOCAB - 1]])
    check_token_ids(good, vocab_size=VOCAB, where="ids.pt")
    with pytest.raises(SppError, match=f"token id {VOCAB} is outside the model's vocabulary"):
        check_token_ids(torch.tensor([[1, VOCAB]]), vocab_size=VOCAB, where="ids.pt")
    with pytest.raises(SppError, match="negative"):
        check_token_ids(torch.tensor([[-1, 2]]), vocab_size=VOCAB, where="ids.pt")
    with pytest.raises(SppError, match="must be integers"):
        check_token_ids(torch.zeros(2, 3), vocab_size=VOCAB, where="ids.pt")
    import numpy as np

    with pytest.raises(SppError, match="outside"):
        check_token_ids(np.array([[3, 200]], dtype=np.int32), vocab_size=VOCAB, where="ids.npy")


def test_integer_tensor_files_flow_through_as_ids(tmp_path):
    """A saved (N, L) int64 tensor reaches the model as the same integers (TensorInput keeps integer dtypes)."""
    ids = token_ids(3, 5)
    path = tmp_path / "ids.pt"
    torch.save(ids, path)
    from spp.inputs import load_tensor_file

    source = TensorInput(load_tensor_file(str(path)), batch_size=2, where=str(path))
    batches = list(source.batches())
    assert all(b.dtype == torch.long for b in batches)
    assert torch.equal(torch.cat(batches), ids)
    model = small("llama")
    with torch.no_grad():
        model(batches[0])  # ids as the first positional argument, as the recorder passes them


def _word_tokenizer(folder, words: list[str]) -> dict[str, int]:
    """A whitespace WordLevel tokenizer saved like a model's own; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return vocab


def test_text_input_uses_the_models_own_tokenizer(tmp_path):
    """A text file through the tokenizer saved in the model's folder, cut into consecutive seq_len windows: the
    ids are the words' vocabulary indices, in order, the partial last window dropped."""
    folder = tmp_path / "model"
    folder.mkdir()
    small("llama").save_pretrained(folder)
    vocab = _word_tokenizer(folder, ["the", "cat", "sat", "on", "mat"])
    words = ("the cat sat on the mat " * 3).split()  # 18 words: two windows of 8, 2 left over
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(words), encoding="utf-8")
    _model, _name, info = load_hf(str(folder))
    assert info.tokenizer == str(folder)
    source = TextInput.from_file(
        str(text), tokenizer=info.tokenizer, vocab_size=info.vocab_size, seq_len=8, batch_size=1
    )
    expected = torch.tensor([vocab[w] for w in words[:16]]).reshape(2, 8)
    assert torch.equal(torch.cat(list(source.batches())), expected)
    assert source.describe()["tokens_read"] == 18
    with pytest.raises(SppError, match="fewer than one sequence"):
        TextInput.from_file(str(text), tokenizer=info.tokenizer, vocab_size=info.vocab_size, seq_len=64)


def test_text_input_reads_a_large_file_only_as_far_as_needed(tmp_path, monkeypatch):
    """Pieces of whole lines (at least 12 characters here) are tokenised until the sequences asked for are filled.
    One sequence of 4 words: piece 1 is "the cat sat\\n" (12 characters, 3 words, not enough), piece 2 is the next
    two lines (11 + 12 characters, 6 words): 9 of the file's 600 words are read. A word-level tokenizer gives the
    words' indices whatever the piece boundaries."""
    import spp.inputs as token_inputs

    monkeypatch.setattr(token_inputs, "_PIECE_CHARS", 12)
    folder = tmp_path / "model"
    folder.mkdir()
    small("llama").config.save_pretrained(folder)
    vocab = _word_tokenizer(folder, ["the", "cat", "sat", "on", "mat"])
    lines = ["the cat sat", "on the mat", "the cat sat", "on the mat"] * 50
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = TextInput.from_file(str(text), tokenizer=str(folder), vocab_size=VOCAB, seq_len=4, num_samples=1)
    assert source.describe()["tokens_read"] == 9
    assert source.batch(0).tolist() == [[vocab[w] for w in ["the", "cat", "sat", "on"]]]


def test_text_input_without_a_tokenizer_says_what_to_do(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some words", encoding="utf-8")
    _model, _name, info = load_hf(
        "llama?num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2,vocab_size=96"
    )
    assert info.tokenizer is None
    with pytest.raises(SppError, match=r"needs the model's tokenizer.*--input tokens"):
        TextInput.from_file(str(text), tokenizer=info.tokenizer, vocab_size=info.vocab_size, seq_len=4)


# ---- loading -------------------------------------------------------------------------------------------------


def test_model_type_with_overrides_builds_offline():
    """hf:TYPE?k=v sets exactly those config fields; info reads sizes off the built model."""
    torch.manual_seed(0)
    model, name, info = load_hf("gpt2?n_layer=2,n_embd=64,n_head=4,vocab_size=96,resid_pdrop=0.0")
    assert name == "hf:gpt2?n_layer=2,n_embd=64,n_head=4,vocab_size=96,resid_pdrop=0.0"
    assert type(model).__name__ == "GPT2Model" and not model.training
    assert model.config.n_layer == 2 and model.config.resid_pdrop == 0.0 and len(model.h) == 2
    assert info == HFInfo(
        model_type="gpt2",
        model_class="GPT2Model",
        source="config",
        pretrained=False,
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        max_positions=1024,
        is_encoder_decoder=False,
        main_input_name="input_ids",
        tokenizer=None,
    )


def test_overrides_rederive_dependent_fields(tmp_path):
    """Fields a config derives from others follow the overrides: Llama's head_dim = hidden_size / heads = 64 / 4 = 16
    (not the default 4096 / 32 = 128), T5's decoder depth = num_layers unless given; also from a saved config."""
    llama, _, _ = load_hf("llama?num_hidden_layers=1,hidden_size=64,intermediate_size=128,num_attention_heads=4")
    assert llama.config.head_dim == 16 and llama.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    t5, _, _ = load_hf("t5?num_layers=1,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=96")
    assert (len(t5.encoder.block), len(t5.decoder.block)) == (1, 1)
    t5, _, _ = load_hf("t5?num_layers=1,num_decoder_layers=3,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=96")
    assert (len(t5.encoder.block), len(t5.decoder.block)) == (1, 3)
    wide, _, _ = load_hf("llama?num_hidden_layers=1,hidden_size=128,intermediate_size=64,num_attention_heads=4")
    wide.config.vocab_size = 96
    wide.config.save_pretrained(tmp_path)
    narrow, _, _ = load_hf(f"{tmp_path}?hidden_size=64")
    assert narrow.config.head_dim == 16 and narrow.config.intermediate_size == 64  # the saved value is kept


def test_overrides_rederive_list_fields_and_bad_ones_are_one_line():
    """Qwen2 keeps one `layer_types` entry per layer, derived from num_hidden_layers (default 24): overriding the
    depth to 2 must give 2 entries (a kept list of 24 made the config's own validation raise); a value the config
    rejects is one SppError line, not the validator's exception."""
    model, _, _ = load_hf("qwen2?num_hidden_layers=2,hidden_size=64,num_attention_heads=4,intermediate_size=128,"
                          "vocab_size=96")
    assert len(model.config.layer_types) == 2 and len(model.layers) == 2
    with pytest.raises(SppError, match="the config rejects these options"):
        load_hf("qwen2?num_hidden_layers=2,layer_types=[1]")


def test_info_max_positions_and_encoder_decoder():
    """Absolute tables bound the sequence (BERT 512; RoBERTa 514 rows less its padding offset of 2: 512);
    rotary (Llama) and relative (T5) models have none."""
    spec = "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,vocab_size=96"
    assert load_hf(f"bert?{spec}")[2].max_positions == 512
    assert load_hf(f"roberta?{spec},max_position_embeddings=514")[2].max_positions == 512
    assert load_hf(f"llama?{spec}")[2].max_positions is None
    t5 = load_hf("t5?num_layers=1,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=96")[2]
    assert t5.max_positions is None and t5.is_encoder_decoder


def test_model_class_option():
    model, _, info = load_hf(
        "llama?class=causal-lm,num_hidden_layers=1,hidden_size=32,intermediate_size=64,"
        "num_attention_heads=2,vocab_size=96"
    )
    assert type(model).__name__ == "LlamaForCausalLM" and info.model_class == "LlamaForCausalLM"
    model, _, _ = load_hf(
        "llama?class=LlamaForSequenceClassification,num_hidden_layers=1,hidden_size=32,"
        "intermediate_size=64,num_attention_heads=2,vocab_size=96"
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llama?num_hiden_layers=2", "has no field 'num_hiden_layers' (did you mean: num_hidden_layers?)"),
        ("llama?class=Nope", "class='Nope' is no transformers model class"),
        ("llama?dtype=int8", "dtype='int8'"),
        ("llama?layers", "must read KEY=VALUE"),
        ("./no-such-folder", "no such folder"),
        ("", "needs a model type"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(SppError) as info:
        load_hf(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pretrained_needs_weights_from_somewhere():
    with pytest.raises(SppError, match="is a model type"):
        load_hf("llama", pretrained=True)


def test_folder_round_trip_loads_weights_only_when_pretrained(tmp_path):
    """save_pretrained then hf:FOLDER: with --pretrained the state_dict is the saved one (safetensors); without,
    the architecture only, randomly initialised."""
    torch.manual_seed(0)
    model, _, _ = load_hf(
        "llama?num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2,vocab_size=96"
    )
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, name, info = load_hf(str(tmp_path), pretrained=True)
    assert info.source == "folder" and info.pretrained and name == f"hf:{tmp_path}"
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    torch.manual_seed(1)
    fresh, _, _ = load_hf(str(tmp_path))
    assert not torch.equal(fresh.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)


def test_folder_errors(tmp_path):
    with pytest.raises(SppError, match=r"holds no config\.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(SppError, match="never runs such code"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    with pytest.raises(SppError, match="holds no weights"):
        load_hf(str(tmp_path), pretrained=True)


def test_hub_id_offline_fails_fast(monkeypatch):
    """Not cached and HF_HUB_OFFLINE set: one line saying so, without any network attempt."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", os.fspath(os.path.dirname(__file__)))  # no cache there
    with pytest.raises(SppError, match="HF_HUB_OFFLINE is set") as info:
        load_hf("some-org/some-model-that-is-not-cached", pretrained=True)
    assert "\n" not in str(info.value)


def test_without_transformers_the_error_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SppError, match=r"pip install 'spp\[hf\]'"):
        load_hf("llama")


def test_option_values_are_parsed_strictly():
    assert [parse_value(v) for v in ("8", "-3", "1e-5", "0.5", "true", "False", "none", "'8'", "silu")] == [
        8,
        -3,
        1e-5,
        0.5,
        True,
        False,
        None,
        "8",
        "silu",
    ]


# ---- the CLI end to end -------------------------------------------------------------------------------------------


def test_cli_plot_on_gpt2_end_to_end(tmp_path):
    """`spp plot --model 'hf:gpt2?...'` with its default token input: 2 taps per layer plus the stem, in the order
    attn, mlp; every number equals a float64 computation on tensors this test captures from the same model (built
    with the run's seed) on the same token ids; the references are the three transformer families, at the closest
    depth (2 layers -> 6), on the same sequence length and token ids, never a ResNet."""
    import csv

    from typer.testing import CliRunner

    from spp.cli import app
    from spp.inputs import make_input
    from spp.loading import load_model

    spec = f"hf:gpt2?n_layer=2,n_embd=32,n_head=2,vocab_size={VOCAB}"
    out = tmp_path / "gpt.png"
    result = CliRunner().invoke(app, ["plot", "--model", spec, "--seq-len", "16", "--num-samples", "4",
                                      "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "gpt.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    curves = list(dict.fromkeys(r["model"] for r in rows))
    assert len(curves) == 4 and curves[1:] == ["Pre-LN transformer 6", "Post-LN transformer 6", "NF transformer 6"]
    mine = [r for r in rows if r["model"] == curves[0]]
    assert [(r["layer"], r["branch"]) for r in mine] == [("0", ""), ("1", "attn"), ("1", "mlp"), ("2", "attn"),
                                                         ("2", "mlp")]
    assert all(len([r for r in rows if r["model"] == c]) == 1 + 2 * 6 for c in curves[1:])

    torch.manual_seed(0)  # the run's seed: the same weights
    loaded = load_model(spec)
    model = loaded.model.eval()
    source = make_input(None, num_samples=4, batch_size=2, seed=0, tokens=loaded.tokens, seq_len=16)
    captured: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(_module, _args, output):
            captured.setdefault(name, []).append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    handles = [model.drop.register_forward_hook(keep("stem"))]
    for i, layer in enumerate(model.h):
        handles += [layer.attn.register_forward_hook(keep(f"attn{i}")),
                    layer.mlp.register_forward_hook(keep(f"mlp{i}"))]
    with torch.no_grad():
        for batch in source.batches(None, device=torch.device("cpu")):
            model(batch)
    for h in handles:
        h.remove()

    def stats(t: torch.Tensor) -> tuple[float, float]:
        flat = t.double().reshape(-1, t.shape[-1])
        return float(flat.mean(0).square().mean()), float(flat.var(0, unbiased=False).mean())

    stream = torch.cat(captured["stem"]).double()
    expected = [(*stats(stream), None)]
    for i in range(2):
        for part in ("attn", "mlp"):
            branch = torch.cat(captured[f"{part}{i}"]).double()
            stream = stream + branch
            expected.append((*stats(stream), stats(branch)[1]))
    for row, (sq_mean, var, res_var) in zip(mine, expected, strict=True):
        assert float(row["avg_sq_mean"]) == pytest.approx(sq_mean, rel=1e-4)
        assert float(row["avg_var"]) == pytest.approx(var, rel=1e-4)
        if res_var is not None:
            assert float(row["res_avg_var"]) == pytest.approx(res_var, rel=1e-4)


@pytest.mark.parametrize("kind", ["tokens", "embeddings"])
def test_cli_takes_the_token_inputs_by_name(tmp_path, kind):
    """`--input tokens` / `--input embeddings` name generated inputs, not files: the record says which input it
    got and of what shape (ids: (L,); embeddings: (L, hidden))."""
    from typer.testing import CliRunner

    from spp.cli import app
    from spp.files import load_record

    out = tmp_path / "r.pt"
    result = CliRunner().invoke(app, ["record", "--model", f"hf:gpt2?n_layer=1,n_embd=32,n_head=2,vocab_size={VOCAB}",
                                      "--input", kind, "--seq-len", "8", "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = load_record(out).settings
    assert settings["input"] == kind and settings["input_shape"] == ([8] if kind == "tokens" else [8, 32])

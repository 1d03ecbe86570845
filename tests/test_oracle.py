"""The oracle (tests/oracle.py) on toy blocks whose residual additions are known by construction.

Every expected value below follows from the toy's code: which operand is the shortcut, which axis holds the
channels, which tensor is the branch before its scale. Tensors are compared with values captured by our own
hooks or recomputed from the captured inputs, never with the oracle's own output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracle import AddEvent, channel_stats, residual_adds, trace


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seeded(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hook_outputs(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Clones of the named modules' outputs (and inputs under "name:in") in the next forward."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:

        def post(m, a, out, n=n) -> None:  # returning a value would replace the module's output
            seen.setdefault(n, out.clone())

        def pre(m, a, n=n) -> None:
            seen.setdefault(f"{n}:in", a[0].clone())

        handles.append(modules[n].register_forward_hook(post))
        handles.append(modules[n].register_forward_pre_hook(pre))
    return seen, handles


def _run(model: nn.Module, names: list[str], *args) -> tuple[list[AddEvent], dict[str, torch.Tensor]]:
    seen, handles = _hook_outputs(model, names)
    try:
        events = residual_adds(model, *args, keep_tensors=True)
    finally:
        for h in handles:
            h.remove()
    return events, seen


# ---- toys --------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PreNormLayerScale(nn.Module):
    """Tokens (B, N, C): x + g1 * mix(norm1(x)); then x + g2 * mlp(norm2(x)). Layer scales are Parameters."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.mix = nn.Linear(c, c)
        self.mlp = Mlp(c, 2 * c)
        self.g1 = nn.Parameter(torch.full((c,), 0.5))
        self.g2 = nn.Parameter(torch.linspace(0.1, 0.9, c))

    def forward(self, x):
        x = x + self.g1 * self.mix(self.norm1(x))
        return x + self.g2 * self.mlp(self.norm2(x))


class PostNorm(nn.Module):
    """BERT-like: norm1(x + mix(x)), then norm2(h + mlp(h)): the sums are the norms' inputs."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.mix, self.mlp = nn.Linear(c, c), Mlp(c, 2 * c)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x):
        h = self.norm1(x + self.mix(x))
        return self.norm2(h + self.mlp(h))


class ClassAttention(nn.Module):
    """CaiT-like: forward(x, x_cls) adds into its *second* argument: x_cls + proj(mean of cat(x_cls, x))."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)

    def forward(self, x, x_cls):
        u = self.norm(torch.cat([x_cls, x], dim=1))
        return x_cls + self.proj(u.mean(dim=1, keepdim=True))


class ClassHead(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.block = ClassAttention(c)

    def forward(self, x):
        x = self.embed(x)
        return self.block(x, self.cls_token.expand(x.shape[0], -1, -1) + x.mean(1, keepdim=True))


class ChannelsLastBranch(nn.Module):
    """ConvNeXt-like on NCHW: the branch runs channels-last and its layer scale is applied *before* the permute
    back, so the branch before its scale is an NHWC tensor (channels on axis 3) and the sum is NCHW (axis 1)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = Mlp(c, 3 * c)
        self.gamma = nn.Parameter(torch.linspace(0.2, 0.8, c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.mlp(self.norm(y))
        return x + y.permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    def __init__(self, block: nn.Module, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x))


class PositionEmbedded(nn.Module):
    """Three position embeddings of the very shape of the tokens (batch 1), none of them a residual addition:
    a learned table, one interpolated from a smaller table (parameters only), and a sin-cos table from arange.
    Then one genuine residual addition."""

    def __init__(self, c: int = 4, n: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 2, stride=2)
        self.pos = nn.Parameter(_seeded((1, n, c), 3))
        self.small_pos = nn.Parameter(_seeded((1, c, 1, 2), 4))
        self.mlp = Mlp(c, 2 * c)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)  # (1, N, C)
        x = x + self.pos
        grid = F.interpolate(self.small_pos, size=(2, 2), mode="bilinear", align_corners=False)
        x = x + grid.flatten(2).transpose(1, 2)
        n, c = x.shape[1], x.shape[2]
        angle = torch.arange(n, dtype=x.dtype)[:, None] / (10.0 ** (torch.arange(c, dtype=x.dtype) / c))
        x = x + torch.sin(angle)[None]
        return x + self.mlp(x)


class TokenMixer(nn.Module):
    """MLP-Mixer block: the token MLP runs on (B, C, N) and its Linear mixes tokens, not channels."""

    def __init__(self, n: int = 5, c: int = 6) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.tokens = Mlp(n, 2 * n)
        self.channels = Mlp(c, 2 * c)

    def forward(self, x):
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class MergedChannels(nn.Module):
    """(B, C, N) reshaped to (B*C, N) for a Linear over N, then back: the channel digit survives the round trip."""

    def __init__(self, c: int = 3, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(2, c, 1)
        self.over_n = nn.Linear(n, n)

    def forward(self, x):
        x = self.embed(x)
        b, c, n = x.shape
        return x + self.over_n(x.reshape(b * c, n)).view(b, c, n)


class Rope(nn.Module):
    """x * cos + rotate_half(x) * sin after a projection: an add of two activations with no learned layer
    between them (weightless), then a genuine residual."""

    def __init__(self, c: int = 4, n: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(c, c)
        angle = torch.arange(n)[:, None] * torch.linspace(0.1, 1.0, c)[None]
        self.register_buffer("cos", torch.cos(angle))
        self.register_buffer("sin", torch.sin(angle))

    def forward(self, x):
        q = self.q(x)
        rot = torch.cat([-q[..., q.shape[-1] // 2 :], q[..., : q.shape[-1] // 2]], dim=-1)
        return x + (q * self.cos + rot * self.sin)


class PostActProjection(nn.Module):
    """torchvision-style: out = bn(conv(x)); out += proj(x) in place; relu. Projection shortcut: a parallel add."""

    def __init__(self, cin: int = 3, cout: int = 5) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += self.proj(x)
        return self.act(out)


class InplaceScales(nn.Module):
    """NF-ResNet-like: branch.mul_(skip_gain) in place, then branch * alpha + x; and an addcmul residual."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.skip_gain = nn.Parameter(torch.tensor(0.7))
        self.gamma = nn.Parameter(torch.linspace(0.3, 0.9, c)[:, None, None])

    def forward(self, x):
        b = self.conv(x)
        b.mul_(self.skip_gain)
        x = b * 0.2 + x
        return torch.addcmul(x, self.gamma, self.conv2(x))


# ---- tests -------------------------------------------------------------------------------------------------


def test_pre_norm_block_with_layer_scale():
    """x + g * f(norm(x)) twice: identity adds, shortcut = lhs (x), channels on the last axis (Linear), branch
    before its scale = the mix / mlp output; the operands are x and g * f, the sum is their sum."""
    model = PreNormLayerScale().eval()
    x = _seeded((2, 3, 6))
    events, seen = _run(model, ["mix", "mlp", "norm2"], x)
    assert [(e.kind, e.shortcut, e.channel_axis, e.channels, e.branch_scaled) for e in events] == [
        ("identity", 0, 2, 6, True),
        ("identity", 0, 2, 6, True),
    ]
    first, second = events
    assert [e.branch_modules for e in events] == [("mix",), ("mlp.fc2", "mlp")]  # innermost first
    assert torch.equal(first.tensors.branch, seen["mix"]) and torch.equal(second.tensors.branch, seen["mlp"])
    assert torch.equal(first.tensors.lhs, x)
    assert torch.equal(first.tensors.rhs, model.g1.detach() * seen["mix"])
    assert torch.equal(first.tensors.out, seen["norm2:in"])  # the first sum is what norm2 reads
    assert torch.equal(second.tensors.rhs, model.g2.detach() * seen["mlp"])
    assert torch.equal(second.tensors.out, seen["norm2:in"] + second.tensors.rhs)
    assert first.module == second.module == "" and first.stack == ("",)


def test_post_norm_block_sums_are_the_norm_inputs():
    """norm(x + f(x)): the sum is norm1's input, not the block output; the branch is unscaled."""
    model = PostNorm().eval()
    x = _seeded((2, 3, 6))
    events, seen = _run(model, ["mix", "mlp", "norm1", "norm2"], x)
    assert [(e.kind, e.shortcut, e.channel_axis, e.branch_scaled) for e in events] == [
        ("identity", 0, 2, False),
        ("identity", 0, 2, False),
    ]
    assert torch.equal(events[0].tensors.out, seen["norm1:in"])
    assert torch.equal(events[1].tensors.out, seen["norm2:in"])
    assert torch.equal(events[0].tensors.branch, seen["mix"])
    assert torch.equal(events[1].tensors.lhs, seen["norm1"])  # the shortcut of the second add is norm1's output
    assert events[1].shortcut_module == "norm1"


def test_add_into_the_second_argument():
    """block(x, x_cls) returns x_cls + proj(...): the shortcut is the second argument, the event is inside the
    block (innermost running module), and the cls token (a parameter) plus a mean is an activation."""
    model = ClassHead().eval()
    x = _seeded((2, 3, 6))
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}

    def keep_second_argument(m, a) -> None:
        got.setdefault("x_cls", a[1].clone())

    h = modules["block"].register_forward_pre_hook(keep_second_argument)
    try:
        events = residual_adds(model, x, keep_tensors=True)
    finally:
        h.remove()
    ours = [e for e in events if e.module == "block"]
    assert len(ours) == 1
    e = ours[0]
    assert e.stack == ("", "block") and e.kind == "identity" and e.shortcut == 0
    assert torch.equal(e.tensors.lhs, got["x_cls"])
    assert e.branch_module == "block.proj" and e.channel_axis == 2 and e.shape == (2, 1, 6)


def test_channels_last_branch_scaled_before_the_permute():
    """NCHW sum with C == H == W (no rank or size rule can tell the axes apart): the channels are on axis 1
    (they come from a convolution); the branch before gamma is the mlp's NHWC output (axis 3)."""
    model = ConvStem(ChannelsLastBranch(4), 4).eval()
    img = _seeded((2, 3, 4, 4))
    events, seen = _run(model, ["block.mlp", "block"], img)
    assert len(events) == 1
    e = events[0]
    assert (e.kind, e.shortcut, e.channel_axis, e.channels, e.shape) == ("identity", 0, 1, 4, (2, 4, 4, 4))
    assert e.branch_scaled and e.branch_axis == 3 and e.branch_shape == (2, 4, 4, 4)
    assert e.branch_modules == ("block.mlp.fc2", "block.mlp")
    assert torch.equal(e.tensors.branch, seen["block.mlp"])
    assert torch.equal(e.tensors.out, seen["block"])
    # statistics on the oracle's axes equal the ones on the axes the toy's code defines
    gamma = model.block.gamma.detach()
    nchw_branch = (gamma * seen["block.mlp"]).permute(0, 3, 1, 2)
    assert torch.equal(e.tensors.rhs, nchw_branch)
    per_channel = seen["block.mlp"].double().reshape(-1, 4)
    assert channel_stats(e.tensors.branch, e.branch_axis)[1] == pytest.approx(
        float(per_channel.var(0, correction=0).mean()), rel=1e-12
    )


def test_position_embeddings_are_not_residual_additions():
    """Batch 1, so every embedding has the tokens' exact shape: only the activation rule can exclude them.
    The one residual, x + mlp(x), is the only event."""
    model = PositionEmbedded().eval()
    events, seen = _run(model, ["mlp"], _seeded((1, 3, 4, 4)))
    assert len(events) == 1
    assert events[0].kind == "identity" and events[0].branch_modules == ("mlp.fc2", "mlp")
    assert torch.equal(events[0].tensors.branch, seen["mlp"])
    assert torch.equal(events[0].tensors.lhs, seen["mlp:in"])


def test_token_mlp_keeps_the_channel_axis():
    """The token MLP's Linear acts on the token axis (the channels sit on axis 1 of its input), so both adds
    have their channels on the last axis, and the first branch is read after the transpose back. The model's
    raw input has no proven layout (no layer made it), so the first add's lhs axis is unknown."""
    model = TokenMixer().eval()
    events, seen = _run(model, ["tokens", "channels"], _seeded((2, 5, 6)))
    assert [(e.kind, e.channel_axis, e.channels, e.operand_axes) for e in events] == [
        ("identity", 2, 6, (None, 2)),
        ("identity", 2, 6, (2, 2)),
    ]
    assert not events[0].branch_scaled and torch.equal(events[0].tensors.rhs, seen["tokens"].transpose(1, 2))
    assert events[0].branch_modules == ("tokens.fc2", "tokens")  # through the transpose back


def test_a_merged_channel_axis_is_restored_by_the_inverse_view():
    """(B, C, N) -> (B*C, N) -> Linear over N -> (B, C, N): channels on axis 1 (from the Conv1d) after all."""
    model = MergedChannels().eval()
    events = residual_adds(model, _seeded((2, 2, 4)))
    assert [(e.channel_axis, e.channels, e.conflict) for e in events] == [(1, 3, False)]


def test_rope_is_weightless_and_the_residual_is_not():
    """q * cos + rotate(q) * sin: both operands come from q through buffers only: "weightless". x + rope(q(x))
    has a Linear between x and its branch: "identity"."""
    model = Rope().eval()
    events = residual_adds(model, _seeded((2, 3, 4)))
    assert [e.kind for e in events] == ["weightless", "identity"]


def test_projection_shortcut_and_post_activation():
    """out += proj(x): neither operand is an ancestor of the other ("parallel"); the conv branch has more ops of
    its own, so the shortcut guess is the projection (rhs); the in-place add's operands are cloned before it
    runs, and the ReLU after the sum is kept in ``post``."""
    model = PostActProjection().eval()
    x = _seeded((2, 3, 4, 4))
    events, seen = _run(model, ["bn", "proj", "act"], x)
    assert len(events) == 1
    e = events[0]
    assert (e.kind, e.shortcut, e.channel_axis, e.op) == ("parallel", 1, 1, "add_")
    assert e.shortcut_module == "proj" and e.branch_module == "bn"
    assert torch.equal(e.tensors.lhs, seen["bn"]) and torch.equal(e.tensors.rhs, seen["proj"])
    assert torch.equal(e.tensors.out, seen["bn"] + seen["proj"])
    assert [name for name, _ in e.tensors.post] == ["relu_"]
    assert torch.equal(e.tensors.post[0][1], seen["act"])


def test_in_place_scale_and_addcmul():
    """conv(x).mul_(gain) * 0.2 + x: the branch before both scales is conv's output, although mul_ overwrote
    it; addcmul(x, gamma, conv2(x)) is the residual x + gamma * conv2(x) with branch conv2(x)."""
    model = InplaceScales().eval()
    x = _seeded((2, 4, 3, 3))
    events, seen = _run(model, ["conv", "conv2"], x)
    assert [(e.op, e.kind, e.shortcut, e.branch_scaled, e.branch_module) for e in events] == [
        ("add", "identity", 1, True, "conv"),
        ("addcmul", "identity", 0, True, "conv2"),
    ]
    assert torch.equal(events[0].tensors.branch, seen["conv"])
    assert torch.equal(events[0].tensors.lhs, seen["conv"] * model.skip_gain.detach() * 0.2)
    assert torch.equal(events[1].tensors.branch, seen["conv2"])
    assert torch.allclose(events[1].tensors.rhs, model.gamma.detach() * seen["conv2"], rtol=1e-6, atol=0)


def test_the_model_is_left_as_it_was():
    """No hook survives the oracle, also when the forward raises; the training flag is untouched."""
    model = PreNormLayerScale().train()
    residual_adds(model, _seeded((2, 3, 6)))
    with pytest.raises(RuntimeError):
        residual_adds(model, _seeded((2, 3, 5)))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert model.training


def test_watched_input_has_its_proven_axis():
    """trace(watch=[block]) keeps the block's first input: the 1x1 conv stem's output, channels on axis 1,
    equal to what the stem returned."""
    model = ConvStem(ChannelsLastBranch(4), 4).eval()
    seen, handles = _hook_outputs(model, ["stem"])
    try:
        traced = trace(model, (_seeded((2, 3, 4, 4)),), keep_tensors=True, watch=["block"])
    finally:
        for h in handles:
            h.remove()
    watched = traced.inputs["block"]
    assert (watched.channel_axis, watched.shape) == (1, (2, 4, 4, 4))
    assert torch.equal(watched.tensor, seen["stem"])
    assert len(traced.events) == 1

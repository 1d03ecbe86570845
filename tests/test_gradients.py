"""Gradient (backward) SPPs: ``grad=True`` / ``--grad``.

What is pinned here:
* the three gradient statistics equal float64 statistics of gradients that this file computes itself, with its own
  forward hooks and one ``torch.autograd.grad`` call, for the documented losses (random projection, xent);
* the model is left alone: parameters' ``.grad`` (None stays None, a set one stays bitwise and the same object),
  ``requires_grad`` flags, the state dict; the forward statistics are bit for bit those of a run without grad;
* micro-batches merge exactly where the model has no batch-dependent layer;
* a linear NF-ResNet's gradient follows from its beta bookkeeping, and BN-ReLU-Conv / NF-ResNet (ReLU) show the
  within-stage growth derived below;
* the CLI records, saves, plots and checks gradient columns end to end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.autograd.graph import get_gradient_edge

import spp.hooks
from spp.discovery import find_taps
from spp.errors import SppError
from spp.models import create_model
from spp.schema import GRAD_STATISTICS
from spp.taps import Difference, Site
from tests.helpers import assert_close, direct_stats
from tests.toys import Chain, FunctionalToy, InplaceToy, TwoAddToy

FORWARD = ("avg_sq_mean", "avg_var", "res_avg_var", "channels", "count", "nonfinite", "check")


# ---- the independent oracle -----------------------------------------------------------------------------------
def documented_loss(name: str, seed: int):
    """The built-in losses as spp's documentation states them (not spp's code): micro-batch j draws from a CPU
    generator seeded with seed * 1_000_003 + j; random: sum(output * g), g ~ N(0, 1); xent: summed cross-entropy
    against labels uniform over the classes."""

    def loss(out: torch.Tensor, j: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j)
        if name == "random":
            return (out * torch.randn(tuple(out.shape), generator=gen)).sum()
        labels = torch.randint(0, out.shape[1], (out.shape[0],), generator=gen)
        return nn.functional.cross_entropy(out, labels, reduction="sum")

    return loss


def first_tensor(value):
    return value if isinstance(value, torch.Tensor) else next(v for v in value if isinstance(v, torch.Tensor))


def autograd_reference(model: nn.Module, taps, batches, loss, axis: int) -> list[tuple[float, float, float]]:
    """Per tap, float64 (grad_avg_sq_mean, grad_avg_var, grad_res_avg_var) over all ``batches``, of gradients
    from ``torch.autograd.grad`` at the site tensors this function's own hooks capture.

    Each site's place in the graph is taken when its hook runs (blocks that add in place change the tensor later).
    A branch read as output - shortcut (a Difference) is made an explicit tensor: the block's output is replaced
    by shortcut + scale * b with b = (output - shortcut) / scale, and autograd differentiates with respect to b.
    """
    modules = dict(model.named_modules())
    grads: dict[tuple[int, str], list[torch.Tensor]] = {}
    for j, batch in enumerate(batches):
        edges: list[tuple[int, str, object, tuple[int, ...]]] = []
        handles = []

        def watch(i: int, which: str, t: torch.Tensor, edges=edges) -> None:
            edges.append((i, which, get_gradient_edge(t), tuple(t.shape)))

        for i, tap in enumerate(taps):
            site = tap.output
            module = modules[site.module]
            if site.kind == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, i=i: watch(i, "out", args[0])))
            elif isinstance(tap.residual, Difference):
                scale = float(tap.residual_scale or 1.0)

                def explicit(m, args, out, i=i, scale=scale):
                    b = (out - args[0]) / scale
                    watch(i, "res", b)
                    new = args[0] + scale * b
                    watch(i, "out", new)
                    return new

                handles.append(module.register_forward_hook(explicit))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, i=i: watch(i, "out", first_tensor(out))))
            if isinstance(tap.residual, Site):
                handles.append(modules[tap.residual.module].register_forward_hook(
                    lambda m, args, out, i=i: watch(i, "res", first_tensor(out))))
        try:
            with torch.enable_grad():
                value = loss(model(batch), j)
                found = torch.autograd.grad(value, [e for _, _, e, _ in edges], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for (i, which, _, shape), g in zip(edges, found, strict=True):
            grads.setdefault((i, which), []).append(torch.zeros(shape) if g is None else g.detach().double())
    out = []
    for i, tap in enumerate(taps):
        sq, var = direct_stats(torch.cat(grads[(i, "out")]), axis)
        res = direct_stats(torch.cat(grads[(i, "res")]), axis)[1] if tap.residual is not None else math.nan
        out.append((sq, var, res))
    return out


def assert_matches_reference(rec, expected, rel: float = 2e-5) -> None:
    """Relative tolerance; the squared mean also to 1e-6 of the variance, the scale of float32's rounding in a
    channel mean (behind a BatchNorm in train mode the gradient's channel means are ~0: BN's backward removes them)."""
    for row, (sq, var, res) in zip(rec.rows, expected, strict=True):
        name = row["name"]
        assert abs(row["grad_avg_sq_mean"] - sq) <= rel * sq + 1e-6 * var, f"{name} grad_avg_sq_mean"
        assert_close(row["grad_avg_var"], var, rel, f"{name} grad_avg_var")
        if math.isnan(res):
            assert math.isnan(row["grad_res_avg_var"]), name
        else:
            assert_close(row["grad_res_avg_var"], res, rel, f"{name} grad_res_avg_var")


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- equal to autograd ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["random", "xent"])
def test_nf_resnet_gradients_equal_autograd(loss):
    """Bottleneck taps read at conv3 (before alpha), projection blocks, two micro-batches merged."""
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    batches = [gaussian(3, 3, 32, 32, seed=j) for j in range(2)]
    rec = spp.hooks.record(model, batches, mode="eval", grad=True, loss=loss, loss_seed=5)
    expected = autograd_reference(model, find_taps(model), batches, documented_loss(loss, 5), axis=1)
    assert_matches_reference(rec, expected)
    assert rec.settings["grad"] is True and rec.settings["loss"] == loss and rec.settings["loss_seed"] == 5
    assert rec.settings["grad_output"] == "output"


def test_torchvision_resnet_in_place_add_and_relu():
    """torchvision's BasicBlock adds in place into bn2's output and applies an in-place ReLU: the gradient at the
    branch site is the one with respect to bn2's output as it was read, not the tensor it became. BN in train
    mode: each micro-batch's own statistics, in the reference too."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    batches = [gaussian(4, 3, 32, 32, seed=7 + j) for j in range(2)]
    rec = spp.hooks.record(model, batches, mode="train", grad=True, loss_seed=1)
    taps = find_taps(model)
    model.train()
    try:
        for m in model.modules():  # as spp.modelstate's train mode: batch statistics, buffers untouched
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
        expected = autograd_reference(model, taps, batches, documented_loss("random", 1), axis=1)
    finally:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = True
        model.eval()
    assert [r["check"] for r in rec.rows[1:]] == ["verified"] * (len(rec.rows) - 1)
    assert_matches_reference(rec, expected)


def test_branch_read_as_output_minus_input_scaled():
    """x + 0.5 * relu(conv(x)): the branch before its scale 0.5 has the gradient 0.5 * dL/d(output); autograd's
    own, through an explicit branch tensor, must agree."""
    torch.manual_seed(0)
    model = Chain(FunctionalToy(4), FunctionalToy(4), stem=nn.Conv2d(3, 4, 3, padding=1))
    batches = [gaussian(2, 3, 8, 8, seed=j) for j in range(2)]
    rec = spp.hooks.record(model, batches, mode="eval", grad=True, loss_seed=3)
    expected = autograd_reference(model, find_taps(model), batches, documented_loss("random", 3), axis=1)
    assert_matches_reference(rec, expected)
    for row in rec.rows[1:]:  # and the derived relation itself: Var(0.5 g) = 0.25 Var(g)
        assert_close(row["grad_res_avg_var"], 0.25 * row["grad_avg_var"], 1e-6, row["name"])


def test_tokens_channel_last_and_the_input_as_stem():
    """Pre-norm transformer blocks on (B, N, C): the channel axis is the last one; with no stem module the stem
    tap is the model's input itself, which has a gradient too (the recorder makes the inputs part of the graph)."""
    torch.manual_seed(0)
    model = Chain(TwoAddToy(8), TwoAddToy(8))
    batches = [gaussian(2, 5, 8, seed=j) for j in range(2)]
    rec = spp.hooks.record(model, batches, mode="eval", grad=True)
    expected = autograd_reference(model, find_taps(model), [b.requires_grad_() for b in batches],
                                  documented_loss("random", 0), axis=2)
    assert_matches_reference(rec, expected)
    assert len(rec.rows) == 5 and all(math.isfinite(r["grad_avg_var"]) for r in rec.rows)


# ---- the model left alone ---------------------------------------------------------------------------------------
def test_grads_flags_and_state_unchanged():
    """.grad None stays None, a set .grad stays bitwise and the same tensor; requires_grad flags (some frozen)
    come back; the state dict is bitwise the same; the frozen stem still gets its gradient statistics."""
    torch.manual_seed(0)
    model = create_model("bn_relu_resnet50", width=0.125)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("stem.") or name.startswith("stages.0.0."):
            p.requires_grad_(False)
    preset = params["fc.weight"]
    preset.grad = torch.randn_like(preset)
    preset_grad, preset_copy = preset.grad, preset.grad.clone()
    flags = {n: p.requires_grad for n, p in params.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rec = spp.hooks.record(model, gaussian(4, 3, 32, 32, seed=0), mode="train", grad=True)
    assert all(math.isfinite(r["grad_avg_var"]) for r in rec.rows)
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert all(p.grad is None for n, p in params.items() if n != "fc.weight")
    assert preset.grad is preset_grad and torch.equal(preset.grad, preset_copy)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_forward_statistics_identical_with_and_without_grad():
    """The forward under autograd runs the same kernels: every forward column bit for bit; without grad the
    gradient columns are NaN."""
    torch.manual_seed(0)
    for name, mode in (("nf_resnet50", "eval"), ("bn_relu_resnet50", "train")):
        model = create_model(name, width=0.125)
        x = gaussian(4, 3, 32, 32, seed=1)
        plain = spp.hooks.record(model, x, mode=mode)
        with_grad = spp.hooks.record(model, x, mode=mode, grad=True)
        for a, b in zip(plain.rows, with_grad.rows, strict=True):
            for key in FORWARD:
                assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), (name, a["name"], key)
            assert all(math.isnan(a[k]) for k in GRAD_STATISTICS)
        assert "grad" not in plain.settings


def test_micro_batches_merge_exactly():
    """NF-ResNet in eval mode has no batch-dependent layer, and a loss summed over samples gives each sample
    the same gradient in any micro-batch: four micro-batches of 2 equal one batch of 8."""
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    x = gaussian(8, 3, 32, 32, seed=2)

    def loss(out):
        return (out * out).sum() / 2  # dL/d(out) = out: per sample, no draw that depends on the batching

    whole = spp.hooks.record(model, x, mode="eval", grad=True, loss=loss)
    parts = spp.hooks.record(model, list(x.split(2)), mode="eval", grad=True, loss=loss)
    assert whole.settings["loss"].startswith("callable")
    for a, b in zip(whole.rows, parts.rows, strict=True):
        for key in GRAD_STATISTICS:
            if math.isnan(a[key]):
                assert math.isnan(b[key])
            else:
                assert_close(b[key], a[key], 1e-5, f"{a['name']} {key}")


def test_a_model_autograd_cannot_differentiate_is_refused_in_one_line():
    """x += 0.5 * relu(conv(x)) overwrites the input conv saved for its backward: the model cannot be trained as it
    is, and --grad says so (its forward alone records fine); nothing of the model changes."""
    torch.manual_seed(0)
    model = Chain(InplaceToy(4), InplaceToy(4), stem=nn.Conv2d(3, 4, 3, padding=1))
    x = gaussian(2, 3, 8, 8, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert math.isfinite(spp.hooks.record(model, x, mode="eval").rows[1]["res_avg_var"])
    with pytest.raises(SppError) as err:
        spp.hooks.record(model, x, mode="eval", grad=True)
    message = str(err.value)
    assert message.startswith("the backward pass of --grad failed: one of the variables needed for gradient "
                              "computation has been modified by an inplace operation") and "\n" not in message
    assert "record without --grad" in message
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_tap_the_loss_does_not_depend_on_has_zero_gradient():
    """A block whose output the model computes and throws away: dL/d(its output) is exactly 0 (counted, not
    missing), while its forward statistics are recorded as usual."""

    class Discards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.blocks = nn.Sequential(FunctionalToy(4), FunctionalToy(4))

        def forward(self, x):
            h = self.blocks[0](self.stem(x))
            self.blocks[1](h)  # computed, never used
            return h

    torch.manual_seed(0)
    rec = spp.hooks.record(Discards(), gaussian(2, 3, 8, 8, seed=0), mode="eval", grad=True)
    used, dropped = rec.rows[1], rec.rows[2]
    assert used["grad_avg_var"] > 0 and dropped["avg_var"] > 0
    assert dropped["grad_avg_var"] == 0.0 and dropped["grad_avg_sq_mean"] == 0.0 and dropped["grad_res_avg_var"] == 0


def test_a_tensor_outside_the_graph_has_no_gradient_statistics():
    """A stem made of constants (nothing it is computed from can require grad): NaN and a note, never a number."""

    class ConstantStem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(FunctionalToy(4), FunctionalToy(4))

        def forward(self, x):
            return self.blocks(torch.ones(x.shape[0], 4, 6, 6).long().float())  # a constant input

    rec = spp.hooks.record(ConstantStem(), gaussian(2, 3, 8, 8, seed=0), mode="eval", grad=True)
    stem = rec.rows[0]
    assert math.isnan(stem["grad_avg_var"]) and "not in the autograd graph" in stem["note"]
    assert math.isfinite(stem["avg_var"]) and math.isfinite(rec.rows[2]["grad_avg_var"])


def test_a_non_finite_gradient_counts_as_nonfinite():
    """An infinite loss scale makes every gradient infinite (or NaN where inf meets 0): the nonfinite column,
    which ends a CLI run with exit code 3, counts those channels; the forward statistics stay finite."""
    torch.manual_seed(0)
    model = Chain(FunctionalToy(4), FunctionalToy(4), stem=nn.Conv2d(3, 4, 3, padding=1))
    rec = spp.hooks.record(model, gaussian(2, 3, 8, 8, seed=0), mode="eval", grad=True,
                           loss=lambda out: out.sum() * math.inf)
    for row in rec.rows:
        assert math.isfinite(row["avg_var"]) and not math.isfinite(row["grad_avg_var"])
        assert row["nonfinite"] == (4 if row["block"] == 0 else 8)  # stream (+ branch) gradients, 4 channels each
    assert rec.has_nonfinite


def test_training_loop_backward_feeds_the_recorder():
    """A SignalRecorder(grad=True) left open in a training loop: the user's own loss.backward() feeds it, and gives
    the same statistics as record() with that loss (the user's backward fills .grad: their choice)."""
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    x = gaussian(4, 3, 32, 32, seed=4)

    def loss(out):
        return (out * out).sum() / 2

    expected = spp.hooks.record(model, x, mode="eval", grad=True, loss=loss)
    with spp.hooks.SignalRecorder(model, mode="eval", grad=True) as recorder:
        loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    rec = recorder.snapshot()
    for a, b in zip(expected.rows, rec.rows, strict=True):
        for key in GRAD_STATISTICS:
            if not math.isnan(a[key]):
                assert_close(b[key], a[key], 1e-5, f"{a['name']} {key}")


# ---- losses ---------------------------------------------------------------------------------------------------
def test_model_outputs_pick_a_tensor():
    """ModelOutput-like dicts: last_hidden_state for the random projection, logits for xent, else the first
    floating tensor in order; integer tensors are skipped."""
    from spp.gradients import select_output

    h, logits = torch.zeros(2, 3, 4), torch.zeros(2, 5)
    assert select_output({"logits": logits, "last_hidden_state": h})[1] == "output['last_hidden_state']"
    assert select_output({"last_hidden_state": h, "logits": logits}, prefer=("logits",))[1] == "output['logits']"
    assert select_output((torch.zeros(2, dtype=torch.long), [h]))[1] == "output[1][0]"
    with pytest.raises(SppError, match="holds no floating-point tensor"):
        select_output({"ids": torch.zeros(2, dtype=torch.long)})


def test_dict_output_model_records_its_hidden_state():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Chain(TwoAddToy(8), TwoAddToy(8))

        def forward(self, x):
            h = self.body(x)
            return {"logits": h[:, 0, :2], "last_hidden_state": h}

    torch.manual_seed(0)
    model = DictOut()
    x = gaussian(2, 5, 8, seed=0)
    rec = spp.hooks.record(model, x, mode="eval", grad=True)
    assert rec.settings["grad_output"] == "output['last_hidden_state']"

    def on_hidden(out, j):
        return documented_loss("random", 0)(out["last_hidden_state"], j)

    expected = autograd_reference(model, find_taps(model), [x.clone().requires_grad_()], on_hidden, axis=2)
    assert_matches_reference(rec, expected)


def test_xent_refuses_an_output_that_is_not_batch_by_classes():
    model = Chain(FunctionalToy(4), stem=nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(SppError, match=r"--loss xent needs a classifier's output of shape \(batch, classes\); the "
                                       r"model's output has shape \(2, 4, 8, 8\): use --loss random"):
        spp.hooks.record(model, gaussian(2, 3, 8, 8, seed=0), mode="eval", grad=True, loss="xent")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "mse"}, "loss must be one of random, xent"),
    ({"grad": 1}, "grad must be True or False"),
    ({"loss": lambda out: out}, "the loss must be a floating-point scalar tensor, not (2, 4, 8, 8)"),
])
def test_bad_gradient_arguments_are_one_line(kwargs, message):
    model = Chain(FunctionalToy(4), stem=nn.Conv2d(3, 4, 3, padding=1))
    params = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
    with pytest.raises(SppError) as err:
        spp.hooks.record(model, gaussian(2, 3, 8, 8, seed=0), mode="eval", **{"grad": True, **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()} == params


# ---- theory ------------------------------------------------------------------------------------------------------
def gradient_power(row) -> float:
    """The gradient's second moment per value, averaged over channels: variance + squared channel mean."""
    return row["grad_avg_var"] + row["grad_avg_sq_mean"]


def test_linear_nf_resnet_gradient_follows_beta_bookkeeping():
    r"""Identity activation: every block is x_{k+1} = s(x_k / beta) + alpha f(x_k / beta), linear, with
    beta^2 = E_k (the expected variance at tap k, the ``expected_var`` column; 1 for the stem) and
    E_{k+1} = E_k + alpha^2 (or 1 + alpha^2 after a stage's first block); s = identity (then beta plays no
    part: s(x) = x), or a Scaled-WS 1x1 projection P with stride t on a stage's first block.

    Backward: g_k = dL/dx_k = s^T g_{k+1} [/ beta] + (alpha / beta) J_f^T g_{k+1}. Over random weights the two
    terms are uncorrelated and each conv's transpose scales the gradient's second moment by its weights' sum of
    squares per input value: Scaled WS (gamma = 1) makes each output row zero-mean with squared norm 1, so a conv
    C_in -> C_out with stride t multiplies it by C_out / (C_in t^2) (each input value feeds C_out k^2 / t^2 weights
    of variance 1 / (C_in k^2)); the bottleneck C -> C/4 -> C/4 -> C' has 4 * 1 * (C/4)/C = 1 times the same
    ratio r = C' / (C t^2) as the projection. So with V_k the second moment of g_k:

        identity block:    V_k = V_{k+1} (1 + alpha^2 / E_k) = V_{k+1} E_{k+1} / E_k
        projection block:  V_k = V_{k+1} r (1 + alpha^2) / E_k = V_{k+1} r E_{k+1} / E_k

    i.e. V_k E_k = r V_{k+1} E_{k+1}: within a stage the gradient's second moment is inversely proportional to
    the forward variance the bookkeeping expects. Zero padding of the 3x3 conv loses a fraction ~2/(3n) per
    spatial dimension on an n x n map (and a stride-2 conv's last odd row feeds one output, not two), so the
    check is on the large maps: 32x32 and 16x16 (stages 1 and 2 at 128 px). The weights are one random draw at
    width 0.25 (bottleneck 16 channels): the cross term and the conv norms fluctuate by a few percent per block,
    hence 12%. alpha = 0.8 makes the expected ratios (1.39, 1.28, ...) stand far out of that; the residual
    gradient is alpha * g exactly (d out / d f = alpha), checked to rounding.
    """
    torch.manual_seed(0)
    alpha = 0.8
    model = create_model("nf_resnet50", width=0.25, activation="identity", alpha=alpha)
    rec = spp.hooks.record(model, gaussian(4, 3, 128, 128, seed=0), mode="eval", grad=True)
    blocks = [b for stage in model.stages for b in stage]
    checked = 0
    for k, (row, nxt) in enumerate(zip(rec.rows, rec.rows[1:], strict=False)):
        block = blocks[k]  # the block from tap k to tap k + 1
        assert_close(nxt["grad_res_avg_var"], alpha**2 * nxt["grad_avg_var"], 1e-6, nxt["name"])
        if nxt["stage"] > 2:
            continue
        r = 1.0
        if block.shortcut is not None:
            conv = block.shortcut
            r = conv.out_channels / conv.in_channels / conv.stride[0] ** 2
        expected = r * nxt["expected_var"] / row["expected_var"]
        assert_close(gradient_power(row) / gradient_power(nxt), expected, 0.12, f"V_{k} / V_{k + 1}")
        checked += 1
    assert checked == 7  # stem -> 3 blocks of stage 1 -> 4 blocks of stage 2


def test_bn_relu_conv_gradient_grows_within_a_stage_nf_barely():
    r"""Within a stage, backward from its last block to its first (V = the gradient's second moment per value).

    BN-ReLU-Conv, train mode, He init: g_k = g_{k+1} + J^T g_{k+1} with J the branch's Jacobian. bn1 divides by
    the stream's channel std, so its transpose multiplies the second moment by 1 / Var(x_k) (avg_var at tap k);
    the rest of the branch multiplies it by G: conv3 (C/4 -> C, weights N(0, 2/fan_in)) 2 * 4, each ReLU 1/2
    (three), conv2 2, conv1 2/4, and bn2, bn3 each 1 / (1 - 1/pi) (their inputs' channel variance: the ReLU's
    channel means, 1/pi of its power, pass the conv as means), so G = 1 / (1 - 1/pi)^2 = 2.152 and

        V_k / V_{k+1} = 1 + G / Var(x_k).

    Var(x_k) grows about linearly along a stage, so the gradient grows towards the stage's input polynomially:
    ~x4.7 over stage 1's taps 1..3 while the forward variance only doubles.
    NF-ResNet (ReLU, Scaled WS with gamma = 1/std(relu(z)), alpha = 0.2): the same recursion with 1/beta^2 =
    1/E_k in place of 1/Var and the branch's backward gain G_nf = gamma^6 / 8 = 3.16 (three conv + ReLU pairs,
    gamma^2 / 2 each, the bottleneck's channel ratios multiplying to 1): V_k / V_{k+1} = 1 + G_nf alpha^2 / E_k
    = 1.12 per block: nearly flat. Checked per block on stages 1 and 2 (16x16 and 8x8 maps at 64 px) to 15% (the
    inner BN variances deviate from 1 - 1/pi by the zero padding's mixing of means into spatial variance).
    """
    bn_factor = 1.0 / (1.0 - 1.0 / math.pi) ** 2
    relu_gamma_sq = 2.0 / (1.0 - 1.0 / math.pi)  # 1 / Var(relu(z)), z ~ N(0, 1)
    nf_factor = relu_gamma_sq**3 / 8.0
    growth = {}
    for name, mode in (("bn_relu_resnet50", "train"), ("nf_resnet50", "eval")):
        torch.manual_seed(0)
        model = create_model(name, width=0.25)
        rec = spp.hooks.record(model, gaussian(8, 3, 64, 64, seed=0), mode=mode, grad=True)
        rows = rec.rows
        for k in range(1, 7):
            row, nxt = rows[k], rows[k + 1]
            if nxt["stage"] != row["stage"]:
                continue  # a projection block: another stride and channel count
            if name.startswith("bn"):
                expected = 1.0 + bn_factor / row["avg_var"]
            else:
                expected = 1.0 + nf_factor * 0.2**2 / row["expected_var"]
            assert_close(gradient_power(row) / gradient_power(nxt), expected, 0.15, f"{name} V_{k}/V_{k + 1}")
        growth[name] = gradient_power(rows[1]) / gradient_power(rows[3])
    assert growth["bn_relu_resnet50"] > 3.5 > 1.5 > growth["nf_resnet50"] > 1.0


# ---- files, CLI, verdicts --------------------------------------------------------------------------------------
def test_old_records_read_gradients_as_nan(tmp_path):
    from spp.files import load_record, save_record

    torch.manual_seed(0)
    rec = spp.hooks.record(create_model("nf_resnet50", width=0.125), gaussian(2, 3, 32, 32, seed=0), mode="eval")
    path = tmp_path / "old.json"
    save_record(rec, path)
    doc = json.loads(path.read_text())
    doc["version"] = 2
    doc["columns"] = [c for c in doc["columns"] if c not in GRAD_STATISTICS]
    for key in GRAD_STATISTICS:
        doc["types"].pop(key)
        for row in doc["rows"]:
            row.pop(key)
    path.write_text(json.dumps(doc))
    loaded = load_record(path)
    assert all(math.isnan(r[key]) for r in loaded.rows for key in GRAD_STATISTICS)


COMMON = ["--model", "nf_resnet50", "--width", "0.125", "--resolution", "32", "--batch-size", "2", "--grad"]


def test_cli_record_and_plot_with_grad(tmp_path):
    from typer.testing import CliRunner

    from spp.cli import app
    from spp.files import load_record

    runner = CliRunner()
    out = tmp_path / "rec.json"
    result = runner.invoke(app, ["record", *COMMON, "--loss", "xent", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rec = load_record(out)
    assert rec.settings["run"]["grad"] is True and rec.settings["loss"] == "xent" and rec.settings["loss_seed"] == 0
    assert all(math.isfinite(r["grad_avg_var"]) and r["grad_avg_var"] > 0 for r in rec.rows)

    fig_path = tmp_path / "spp.png"
    result = runner.invoke(app, ["plot", *COMMON, "--reference", "none", "-o", str(fig_path)])
    assert result.exit_code == 0, result.output
    assert fig_path.stat().st_size > 0

    result = runner.invoke(app, ["record", *COMMON, "--loss", "mse", "-o", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "--loss must be one of random, xent, not 'mse'" in result.output


def test_cli_check_judges_the_gradient_columns(tmp_path):
    """spp check --grad records the gradients and judges them: BN-ReLU-Conv in eval mode (derived in the next
    test) gets a gradient_growth warning in the JSON."""
    from typer.testing import CliRunner

    from spp.cli import app

    verdicts = tmp_path / "v.json"
    args = ["check", "--model", "bn_relu_resnet50", "--width", "0.125", "--resolution", "64", "--batch-size", "4",
            "--mode", "eval", "--grad", "--json", str(verdicts)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # its forward explodes too: errors
    kinds = {f["kind"]: f["level"] for f in json.loads(verdicts.read_text())["findings"]}
    assert kinds.get("gradient_growth") == "warning"


def test_check_reads_gradient_growth_of_bn_eval():
    """BN-ReLU-Conv in eval mode at init is an unnormalised He-ReLU ResNet: each block roughly doubles the
    gradient's second moment towards the input (V_k / V_{k+1} = 1 + G with G ~ 1: He init keeps the branch's
    backward power, and the identity shortcut adds the rest), far beyond the linear bound 1 + n over a stage of
    n blocks: spp.check reports gradient_growth. NF-ResNet (x1.12 per block, derived above) stays within it."""
    from spp.verdicts import check

    kinds = {}
    for name, mode in (("bn_relu_resnet50", "eval"), ("nf_resnet50", "eval")):
        torch.manual_seed(0)
        rec = spp.hooks.record(create_model(name, width=0.125), gaussian(4, 3, 64, 64, seed=0), mode=mode,
                               grad=True)
        kinds[name] = {f.kind for f in check(rec)}
    assert "gradient_growth" in kinds["bn_relu_resnet50"]
    assert not {"gradient_growth", "gradient_vanishing"} & kinds["nf_resnet50"]


def test_render_draws_the_gradient_row():
    import spp.render

    torch.manual_seed(0)
    rec = spp.hooks.record(create_model("nf_resnet50", width=0.125), gaussian(2, 3, 32, 32, seed=0), mode="eval",
                           grad=True)
    fig = spp.render.draw(rec)
    axes = fig.axes
    assert len(axes) == 6
    for ax, key in zip(axes[3:], GRAD_STATISTICS, strict=True):
        line = ax.get_lines()[0]
        ys = [r[key] for r in rec.rows]
        assert [y for y in line.get_ydata() if y == y] == [y for y in ys if y == y]
        assert ax.xaxis_inverted() and "backward order" in ax.get_xlabel()
    plain = spp.hooks.record(create_model("nf_resnet50", width=0.125), gaussian(2, 3, 32, 32, seed=0), mode="eval")
    assert len(spp.render.draw(plain).axes) == 3

"""spp.bn (PreciseBN, EMA discrepancy, train/test SPP, batch-size sweep, SyncBN) against independent computations.

References are float64 computations on BatchNorm inputs captured with hooks of our own in train-mode runs over
the same micro-batches, the EMA recursion worked by hand, and separately recorded SPPs. Model: bn_relu_resnet50
at width 1/8 (49 BatchNorm layers), 32 px inputs.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import spp.hooks
from spp import bn as sppbn
from spp.errors import SppError
from spp.models import create_model
from tests.test_distributed import dist_env, free_port

RES = 32


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("bn_relu_resnet50", width=0.125)


def gaussian(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def capture_bn_inputs(model: nn.Module, batches, *, track: bool = False) -> dict[str, list[torch.Tensor]]:
    """Each BN layer's input on every micro-batch (float64 copies) in a train-mode run of our own: tracking off
    (the buffers stay) unless ``track``; the model's flags are put back afterwards."""
    bns = bn_modules(model)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in bns}
    flags = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in bns.values()]
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().double().clone()))
               for n, m in bns.items()]
    try:
        model.train()
        for m in bns.values():
            m.track_running_stats = track
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
        for m, t in tracking:
            m.track_running_stats = t
        for m, f in flags:
            m.training = f
    return seen


def population(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float64 per-channel mean and ddof-0 variance over (N, H, W) of the concatenated captures."""
    x = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
    mean = x.mean(dim=1)
    return mean, ((x - mean[:, None]) ** 2).mean(dim=1), x.shape[1]


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def ema_updates(model: nn.Module, batches, momentum: float) -> None:
    """k train-mode forwards with tracking on: each BN's buffers take k EMA steps with this momentum."""
    for m in bn_modules(model).values():
        m.momentum = momentum
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    model.eval()


# ---- PreciseBN ------------------------------------------------------------------------------------------------
def test_precise_stats_equal_float64_population_of_captured_inputs():
    """Per layer, the precise mean and ddof-0 variance equal a float64 population computation over the inputs our
    own hooks saw in a train-mode run over the same micro-batches (sizes 4, 4, 6: any sizes merge exactly), to
    1e-6 relative (the mean relative to the channel's std). The average of the per-batch variances is not the
    population variance (it misses the spread of the batch means): the comparison can tell them apart."""
    model = build()
    batches = [gaussian(4, 1), gaussian(4, 2), gaussian(6, 3)]
    before = state_copy(model)
    stats = sppbn.precise_bn_stats(model, batches)
    assert_state_equal(model, before)
    assert model.training  # a fresh model: train mode, as it was
    assert all(m.track_running_stats for m in bn_modules(model).values())
    seen = capture_bn_inputs(model, batches)
    assert list(stats.layers) == list(seen) and len(seen) == 49
    assert stats.samples == 14 and stats.batches == 3 and stats.unused == () and stats.untracked == ()
    gap = 0.0
    for name, xs in seen.items():
        mean, var, count = population(xs)
        layer = stats.layers[name]
        assert layer.count == count and layer.mean.dtype == torch.float64
        assert ((layer.mean - mean).abs() <= 1e-6 * var.sqrt() + 1e-12).all(), name
        assert ((layer.var - var).abs() <= 1e-6 * var + 1e-15).all(), name
        per_batch = torch.stack([population([x])[1] for x in xs]).mean(0)
        gap = max(gap, float(((per_batch - var).abs() / var).max()))
    assert gap > 1e-3


def test_precise_stats_do_not_depend_on_how_samples_are_split_for_the_first_layer():
    """The first BN's input (the stem's output) does not depend on any BN, so its population statistics over the
    same 12 samples are the same whether they come in micro-batches of 2, 3 or 12 (exact merge)."""
    model = build()
    x = gaussian(12, 5)
    first = next(iter(bn_modules(model)))
    ref = sppbn.precise_bn_stats(model, [x]).layers[first]
    for b in (2, 3):
        got = sppbn.precise_bn_stats(model, x.split(b)).layers[first]
        assert torch.allclose(got.mean, ref.mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(got.var, ref.var, rtol=1e-6)


# ---- EMA ------------------------------------------------------------------------------------------------------
def test_ema_discrepancy_matches_the_recursion_by_hand():
    """k = 5 train-mode forwards with momentum m = 0.3 leave running_mean = sum_j m (1-m)^(k-j) mu_j (from 0) and
    running_var = (1-m)^k + sum_j m (1-m)^(k-j) s_j^2 (from 1), s_j^2 the UNBIASED variance of micro-batch j.
    Worked by hand on the captured inputs (float64) it matches the buffers; the discrepancy table then equals our
    own computation of |rm - mu| / sqrt(var + eps) and |(rv + eps) / (var + eps) - 1| against a float64
    population of other data, median and worst channel, worst layer first."""
    model = build()
    k, m = 5, 0.3
    train_batches = [gaussian(4, 10 + j) for j in range(k)]
    seen = capture_bn_inputs(copy.deepcopy(model), train_batches, track=True)  # the same forwards, on a copy
    ema_updates(model, train_batches, m)
    hand = {}
    for name, xs in seen.items():
        rm = torch.zeros(xs[0].shape[1], dtype=torch.float64)
        rv = torch.ones_like(rm)
        for x in xs:
            mu, var, n = population([x])
            rm = (1 - m) * rm + m * mu
            rv = (1 - m) * rv + m * var * n / (n - 1)
        bn = bn_modules(model)[name]
        assert torch.allclose(bn.running_mean.double(), rm, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(bn.running_var.double(), rv, rtol=1e-5), name
        assert int(bn.num_batches_tracked) == k
        hand[name] = (rm, rv)
    data = [gaussian(8, 20), gaussian(8, 21)]
    stats = sppbn.precise_bn_stats(model, data)
    population_inputs = capture_bn_inputs(model, data)
    rows = sppbn.ema_discrepancy(model, stats)
    assert [r.worst for r in rows] == sorted((r.worst for r in rows), reverse=True)
    assert {r.layer for r in rows} == set(hand)
    eps = 1e-5
    for r in rows:
        rm, rv = hand[r.layer]
        mu, var, _ = population(population_inputs[r.layer])
        mean_err = (rm - mu).abs() / (var + eps).sqrt()
        var_err = ((rv + eps) / (var + eps) - 1).abs()
        assert r.num_batches_tracked == k and r.momentum == m and r.channels == mu.numel()
        for got, want in ((r.mean_err_median, mean_err.median()), (r.mean_err_max, mean_err.max()),
                          (r.var_err_median, var_err.median()), (r.var_err_max, var_err.max())):
            assert abs(got - float(want)) <= 1e-4 * float(want) + 1e-5, r.layer
        assert float(mean_err[r.mean_err_channel]) >= float(mean_err.max()) - 1e-5
        assert float(var_err[r.var_err_channel]) >= float(var_err.max()) - 1e-5
    frame = sppbn.to_frame(rows)
    assert list(frame["layer"]) == [r.layer for r in rows] and "var_err_max" in frame.columns


def test_ema_of_the_first_layer_keeps_its_initial_value_weight():
    """The first BN reads the stem output, which no BN touches, so every micro-batch's mean estimates the same
    mu: after k updates from 0, E[running_mean] = (1 - (1-m)^k) mu, and the mean error is (1-m)^k |mu| / std up
    to the batch noise: with m = 0.1 and k = 20, 0.1216 |mu| / std. The stem (a max-pool) has |mu| ~ 2 std."""
    model = build()
    ema_updates(model, [gaussian(8, 30 + j) for j in range(20)], 0.1)
    data = gaussian(64, 99)
    stats = sppbn.precise_bn_stats(model, data.split(16))
    first = next(iter(bn_modules(model)))
    row = next(r for r in sppbn.ema_discrepancy(model, stats) if r.layer == first)
    layer = stats.layers[first]
    expected = 0.9**20 * (layer.mean.abs() / (layer.var + 1e-5).sqrt())
    assert abs(row.mean_err_median - float(expected.median())) < 0.1 * float(expected.median())


# ---- precise state dict ---------------------------------------------------------------------------------------
def test_precise_state_dict_loads_weights_only_and_leaves_the_user_alone(tmp_path):
    model = build()
    ema_updates(model, [gaussian(4, 40 + j) for j in range(3)], 0.1)
    checkpoint = tmp_path / "user.pt"
    torch.save(model.state_dict(), checkpoint)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    before = state_copy(model)
    stats = sppbn.precise_bn_stats(model, [gaussian(8, 50), gaussian(8, 51)])
    state = sppbn.precise_state_dict(model, stats)
    out = tmp_path / "precise.pt"
    torch.save(state, out)
    loaded = torch.load(out, weights_only=True)
    fresh = build(seed=1)
    fresh.load_state_dict(loaded)
    for name, layer in stats.layers.items():
        bn = bn_modules(fresh)[name]
        assert torch.equal(bn.running_mean, layer.mean.float())
        assert torch.equal(bn.running_var, layer.var.float())
        assert int(bn.num_batches_tracked) == 3
    for k, v in before.items():
        if not k.endswith(("running_mean", "running_var")):
            assert torch.equal(fresh.state_dict()[k], v), k
    state[next(k for k in state if k.endswith("running_mean"))].add_(1.0)  # a copy: the model does not move
    assert_state_equal(model, before)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest


# ---- train / test SPP -----------------------------------------------------------------------------------------
def test_train_test_spp_equals_three_separate_records():
    """(a) spp.hooks.record in train mode, (b) in eval mode on a deep copy loaded with precise_state_dict, (c) in
    eval mode with the EMA buffers: the same numbers, and the divergence is |log10| of their ratios."""
    model = build()
    ema_updates(model, [gaussian(4, 60 + j) for j in range(4)], 0.1)
    batches = [gaussian(4, 70), gaussian(4, 71), gaussian(4, 72)]
    before = state_copy(model)
    stats = sppbn.precise_bn_stats(model, batches)
    result = sppbn.train_test_spp(model, batches, stats)
    assert_state_equal(model, before)
    a = spp.hooks.record(model, batches, mode="train")
    twin = copy.deepcopy(model)
    twin.load_state_dict(sppbn.precise_state_dict(model, stats))
    b = spp.hooks.record(twin, batches, mode="eval")
    c = spp.hooks.record(model, batches, mode="eval")
    keys = ("avg_sq_mean", "avg_var", "res_avg_var")
    for got, want in ((result.minibatch, a), (result.precise, b), (result.ema, c)):
        for rg, rw in zip(got.rows, want.rows, strict=True):
            for key in keys:
                assert rg[key] == rw[key] or (math.isnan(rg[key]) and math.isnan(rw[key])), (rg["name"], key)
    div = result.divergence()
    for row, ra, rb, rc in zip(div, a.rows, b.rows, c.rows, strict=True):
        for key in ("avg_var", "res_avg_var"):
            for label, x, y in (("minibatch/precise", ra, rb), ("minibatch/ema", ra, rc), ("precise/ema", rb, rc)):
                want = abs(math.log10(x[key] / y[key])) if x[key] == x[key] else float("nan")
                got = row[f"{key}:{label}"]
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15) or (math.isnan(got) and math.isnan(want))
    assert max(r["avg_var:precise/ema"] for r in div) > 0.05  # 4 EMA steps from 0 / 1: far from the population


# ---- batch-size sweep -----------------------------------------------------------------------------------------
def test_batch_size_sweep_matches_hand_computation():
    """Per layer and batch size b: the mean over micro-batches and channels of |mu_B - mu| / sqrt(var + eps) and
    |(var_B + eps) / (var + eps) - 1|, var_B the micro-batch's ddof-0 variance and (mu, var) the population of
    the same run, from our own captures; the SPP is spp.hooks.record's over the same micro-batches. 10 samples:
    b = 4 uses the first 8. Smaller batches sit further from the population (mean over layers). With precise
    statistics given, ``population`` is the eval-mode SPP of the same samples on a copy loaded with them, and
    ``spp_divergence`` the largest |log10| avg_var ratio against it."""
    model = build()
    x = gaussian(10, 80)
    before = state_copy(model)
    stats = sppbn.precise_bn_stats(model, [gaussian(8, 81), gaussian(8, 82)])
    results = sppbn.batch_size_sweep(model, x, (2, 4, 8), stats)
    assert_state_equal(model, before)
    twin = copy.deepcopy(model)
    twin.load_state_dict(sppbn.precise_state_dict(model, stats))
    assert [r.samples for r in results] == [10, 8, 8]
    eps = 1e-5
    for res in results:
        micro = list(x[: res.samples].split(res.batch_size))
        seen = capture_bn_inputs(model, micro)
        assert [r.layer for r in res.layers] == list(seen)
        for row in res.layers:
            mu, var, _ = population(seen[row.layer])
            errs = []
            for xb in seen[row.layer]:
                mb, vb, _ = population([xb])
                errs.append((float(((mb - mu).abs() / (var + eps).sqrt()).mean()),
                             float(((vb + eps) / (var + eps) - 1).abs().mean()),
                             float(((vb + eps) / (var + eps) - 1).mean())))
            for got, want in zip((row.mean_err, row.var_err, row.var_bias),
                                 [sum(e[i] for e in errs) / len(errs) for i in range(3)], strict=True):
                assert abs(got - want) <= 1e-5 * abs(want) + 1e-8, (res.batch_size, row.layer)
        ref = spp.hooks.record(model, micro, mode="train")
        assert [r["avg_var"] for r in res.record.rows] == [r["avg_var"] for r in ref.rows]
        pop = spp.hooks.record(twin, micro, mode="eval")
        assert [r["avg_var"] for r in res.population.rows] == [r["avg_var"] for r in pop.rows]
        want = max(abs(math.log10(a["avg_var"] / b["avg_var"])) for a, b in zip(ref.rows, pop.rows, strict=True))
        assert res.spp_divergence == pytest.approx(want, rel=1e-12)
    assert results[0].mean_var_err > results[1].mean_var_err > results[2].mean_var_err


# ---- restoring and refusing -----------------------------------------------------------------------------------
def test_model_restored_when_the_forward_raises():
    model = build()
    ema_updates(model, [gaussian(4, 90)], 0.1)  # leaves the model in eval mode with non-trivial buffers
    before = state_copy(model)
    bad = [gaussian(4, 91), torch.randn(4, 5, RES, RES)]  # the second micro-batch has 5 channels: conv raises
    with pytest.raises(RuntimeError):
        sppbn.precise_bn_stats(model, bad)
    with pytest.raises(RuntimeError):
        sppbn.train_test_spp(model, bad, sppbn.precise_bn_stats(model, bad[:1]))
    assert_state_equal(model, before)
    assert not any(m.training for m in model.modules())
    assert all(m.track_running_stats and not m._forward_pre_hooks for m in bn_modules(model).values())


def test_one_line_errors():
    with pytest.raises(SppError, match="no BatchNorm layer"):
        sppbn.precise_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3)), [gaussian(4, 0)])
    with pytest.raises(SppError, match="at least 2"):
        sppbn.precise_bn_stats(build(), [gaussian(4, 0), gaussian(1, 1)])
    with pytest.raises(SppError, match="batch size 16"):
        sppbn.batch_size_sweep(build(), gaussian(8, 0), (2, 16))
    with pytest.raises(SppError, match="no input batches"):
        sppbn.precise_bn_stats(build(), iter([]))
    stats = sppbn.precise_bn_stats(build(), [gaussian(4, 0)])
    other = create_model("bn_relu_resnet50", width=0.25)
    with pytest.raises(SppError, match="has 16 channels, its precise statistics 8"):
        sppbn.precise_state_dict(other, stats)
    with pytest.raises(SppError, match="does not have"):
        sppbn.ema_discrepancy(nn.Sequential(build()), stats)  # names gain a "0." prefix


# ---- SyncBN ---------------------------------------------------------------------------------------------------
def test_sync_batchnorm_is_a_no_op_without_a_process_group():
    model = build()
    classes = [type(m) for m in model.modules()]
    with sppbn.sync_batchnorm(model) as converted:
        assert converted == 0
        assert [type(m) for m in model.modules()] == classes


def _global_batches() -> list[torch.Tensor]:
    return [gaussian(8, 200 + j) for j in range(3)]


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    from spp import distributed

    os.environ.update(dist_env(rank, world, port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    model = build()
    classes = [type(m) for m in model.modules()]
    local = [b[4 * rank : 4 * rank + 4] for b in _global_batches()]  # rank r: samples 4r..4r+3 of each batch
    with sppbn.sync_batchnorm(model) as converted:
        assert converted == 49
        assert all(type(m).__name__ == "_SyncBatchNorm" for m in bn_modules(model).values())
        rec = spp.hooks.record(model, local, mode="train", distributed=True)
        stats = sppbn.precise_bn_stats(model, local, distributed=True)
    assert [type(m) for m in model.modules()] == classes
    result = {key: [r[key] for r in rec.rows] for key in ("avg_sq_mean", "avg_var", "res_avg_var")}
    result["samples"] = stats.samples
    result["mean"] = {k: v.mean for k, v in stats.layers.items()}
    result["var"] = {k: v.var for k, v in stats.layers.items()}
    torch.save(result, os.path.join(out, f"sync-rank{rank}.pt"))


def test_sync_batchnorm_over_two_ranks_equals_one_process_on_the_concatenation(tmp_path):
    """SyncBN over 2 gloo ranks with 4 samples each per step normalises every BN with the statistics of the 8
    samples together: the same maths as one process with micro-batches of 8 (the rank halves concatenated). The
    SPP (moments merged across ranks) and the precise statistics agree to float32 rounding (the two paths round
    the batch statistics differently, ~1e-6 per layer, compounding over 49 layers to ~4e-5 where the last stage
    has 8 values per channel: 1e-4); micro-batches of 4 in one process (plain BN per rank) do not."""
    mp.start_processes(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = [torch.load(tmp_path / f"sync-rank{r}.pt", weights_only=True) for r in range(2)]
    model = build()
    batches = _global_batches()
    ref = spp.hooks.record(model, batches, mode="train")
    stats = sppbn.precise_bn_stats(model, batches)
    halves = spp.hooks.record(model, [h for b in batches for h in b.split(4)], mode="train")
    for key in ("avg_sq_mean", "avg_var", "res_avg_var"):
        want = torch.tensor([r[key] for r in ref.rows][1:], dtype=torch.float64)
        for g in got:
            assert torch.allclose(torch.tensor(g[key][1:], dtype=torch.float64), want, rtol=1e-4), key
        other = torch.tensor([r[key] for r in halves.rows][1:], dtype=torch.float64)
        assert not torch.allclose(other, want, rtol=1e-3), key
    assert got[0]["samples"] == got[1]["samples"] == 24
    for name, layer in stats.layers.items():
        for g in got:
            assert ((g["mean"][name] - layer.mean).abs() <= 1e-4 * layer.var.sqrt()).all(), name
            assert torch.allclose(g["var"][name], layer.var, rtol=1e-4), name

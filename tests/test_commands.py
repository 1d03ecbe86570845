"""spp bn (commands.bn_report and the CLI) against independent computations: PreciseBN statistics of the BN inputs
our own hooks capture, the EMA error from the checkpoint's buffers, the user's files untouched, SyncBN over 2
ranks. Model: bn_relu_resnet50 at width 1/16 (49 BatchNorm layers), 32 px."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from typer.testing import CliRunner

from spp import commands
from spp.cli import app
from spp.errors import SppError
from spp.models import create_model
from spp.run import RunConfig
from tests.test_bn import bn_modules, capture_bn_inputs, ema_updates, population
from tests.test_distributed import dist_env, free_port

WIDTH = 0.0625
MODEL = ["--model", "bn_relu_resnet50", "--width", str(WIDTH), "--resolution", "32"]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bn_relu_resnet50", width=WIDTH)


@pytest.fixture
def trained(tmp_path):
    """A checkpoint whose BN buffers took 3 EMA updates (momentum 0.1) on Gaussian batches of 4, and 8 samples of
    data in a tensor file; the checkpoint's sha256 to check it is never written."""
    model = build()
    ema_updates(model, [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)],
                0.1)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), ckpt)
    data = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    torch.save(data, tmp_path / "data.pt")
    return ckpt, tmp_path / "data.pt", data, hashlib.sha256(ckpt.read_bytes()).hexdigest()


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_bn_command_end_to_end(tmp_path, trained):
    """The precise buffers equal the float64 population of the BN inputs our hooks capture in a train-mode run of
    the checkpoint over the same micro-batches of 4; the table's worst layer is the one the checkpoint's buffers
    put farthest from that population; the checkpoint file is byte for byte as it was."""
    ckpt, data_path, data, digest = trained
    table, precise, figure = tmp_path / "bn.csv", tmp_path / "precise.pt", tmp_path / "bn.png"
    result = run("bn", *MODEL, "--checkpoint", str(ckpt), "--input", str(data_path), "--batch-size", "4",
                 "--table", str(table), "--precise-out", str(precise), "--plot", str(figure), "--label", "ft")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ft: 49 BatchNorm layers")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert "normalisation batch: 4 samples per micro-batch (one process)" in result.output
    assert "8 samples in 2 micro-batches of 4" in result.output

    model = build()
    state = torch.load(ckpt, weights_only=True)
    model.load_state_dict(state)
    seen = capture_bn_inputs(model, list(data.split(4)))
    written = torch.load(precise, weights_only=True)  # plain tensors only
    assert written.keys() == state.keys()
    worst = {}
    for name, bn in bn_modules(model).items():
        mean, var, _ = population(seen[name])
        assert ((written[f"{name}.running_mean"].double() - mean).abs() <= 1e-6 * var.sqrt() + 1e-7).all(), name
        assert torch.allclose(written[f"{name}.running_var"].double(), var, rtol=1e-6), name
        assert torch.equal(written[f"{name}.num_batches_tracked"], state[f"{name}.num_batches_tracked"])
        rm, rv = state[f"{name}.running_mean"].double(), state[f"{name}.running_var"].double()
        worst[name] = max(float(((rm - mean).abs() / (var + bn.eps).sqrt()).max()),
                          float((((rv + bn.eps) / (var + bn.eps)) - 1).abs().max()))
    assert all(torch.equal(written[k], v) for k, v in state.items() if "running" not in k)

    df = pd.read_csv(table)
    assert len(df) == 49 and df["layer"].iloc[0] == max(worst, key=worst.get)
    top = df.iloc[0]
    assert max(top["mean_err_max"], top["var_err_max"]) == pytest.approx(max(worst.values()), rel=1e-5)
    assert (df["num_batches_tracked"] == 3).all()
    scores = [max(a, b) for a, b in zip(df["mean_err_max"], df["var_err_max"], strict=True)]
    assert scores == sorted(scores, reverse=True)
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.size[0] > 1000


def test_bn_sweep_uses_the_same_samples_at_each_batch_size():
    """--batch-size 4,2 over 8 Gaussian samples: PreciseBN at 4; the sweep at 4 and 2 on all 8 samples
    (floor(8 / b) * b); a sweep row's samples and the train/test SPPs have the model's 17 tap points."""
    cfg = RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH}, resolution=32, num_samples=8)
    result = commands.bn_report(cfg, batch_sizes="4,2")
    assert result.batch_sizes == [4, 2] and result.stats.samples == 8 and result.stats.batches == 2
    assert [(r.batch_size, r.samples) for r in result.sweep] == [(4, 8), (2, 8)]
    assert len(result.train_test.minibatch.rows) == 17
    # at batch 2 the micro-batch statistics are farther from the population than at 4
    assert result.sweep[1].mean_var_err > result.sweep[0].mean_var_err
    pairs = {d["pair"]: d for d in result.divergence()}
    assert pairs["minibatch/ema"]["max_log10"] > 0  # an untrained EMA (buffers 0 / 1) is not the population


def test_bn_refuses_before_touching_anything(tmp_path, trained):
    ckpt, data_path, _, digest = trained
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = {
        ("--checkpoint", str(ckpt), "--precise-out", str(ckpt)): "is one of this command's inputs",
        ("--batch-size", "1"): "at least 2 samples",
        ("--batch-size", "4,x"): "whole numbers separated by commas",
        ("--table", str(tmp_path / "t.xlsx")): "unknown suffix",
        ("--precise-out", str(tmp_path / "p.json")): "unknown suffix",
    }
    for args, message in cases.items():
        result = run("bn", *MODEL, "--input", str(data_path), *args)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.output)
    result = run("bn", "--model", "nf_resnet50", "--width", str(WIDTH), "--resolution", "32")
    assert result.exit_code == 2 and "has no BatchNorm layer" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest


def test_sync_bn_without_torchrun_says_so():
    cfg = RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH}, resolution=32, num_samples=4)
    result = commands.bn_report(cfg, batch_sizes=[2], sync_bn=True)
    assert any("--sync-bn without torchrun" in n for n in result.notes)


def _bn_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(dist_env(rank, world, port))
    torch.set_num_threads(1)
    cfg = RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH}, resolution=32,
                    input=os.path.join(folder, "data.pt"))
    synced = commands.bn_report(cfg, batch_sizes=[2], sync_bn=True)
    plain = commands.bn_report(cfg, batch_sizes=[2])
    if rank == 0:
        torch.save({"synced": synced.normalisation, "plain": plain.normalisation,
                    "mean": {k: v.mean for k, v in synced.stats.layers.items()},
                    "var": {k: v.var for k, v in synced.stats.layers.items()}, "samples": synced.stats.samples},
                   os.path.join(folder, "bn-rank0.pt"))


def test_sync_bn_over_two_ranks_equals_one_process_over_the_concatenated_micro_batch(tmp_path):
    """8 samples of a tensor file, micro-batches of 2: rank r records micro-batches r, r + 2, ..., so SyncBN
    normalises each step over samples [4j, 4j + 4): one process's micro-batch j of 4. The precise statistics
    agree to float32 rounding compounded over 49 layers: the two paths round the batch statistics differently
    (float64 merge vs float32), and the last stage normalises 4 values per channel, which amplifies it; measured
    3.2e-4 at worst, so 1e-3, while one process at micro-batches of 2 (what the ranks would do without SyncBN)
    is off by more than 100 %. Without --sync-bn the summary says each rank normalises its own micro-batch."""
    data = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.save(data, tmp_path / "data.pt")
    mp.start_processes(_bn_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "bn-rank0.pt", weights_only=True)
    assert got["synced"].startswith("normalisation batch: 2 ranks x 2 = 4 samples (--sync-bn")
    assert got["plain"].startswith("normalisation batch: 2 samples, the per-rank micro-batch (2 ranks")
    assert "without --sync-bn" in got["plain"] and got["samples"] == 8
    single = commands.bn_report(RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH}, resolution=32,
                                          input=str(tmp_path / "data.pt")), batch_sizes=[4])
    for name, layer in single.stats.layers.items():
        assert ((got["mean"][name] - layer.mean).abs() <= 1e-3 * layer.var.sqrt()).all(), name
        assert torch.allclose(got["var"][name], layer.var, rtol=1e-3), name
    per_rank = commands.bn_report(RunConfig(model="bn_relu_resnet50", model_kwargs={"width": WIDTH}, resolution=32,
                                            input=str(tmp_path / "data.pt")), batch_sizes=[2])
    assert max(float(((got["var"][n] - layer.var).abs() / layer.var).max())
               for n, layer in per_rank.stats.layers.items()) > 1.0


def test_batch_sizes_parse_strictly():
    assert commands.parse_batch_sizes("32,2, 4,8,2") == [32, 2, 4, 8]
    assert commands.parse_batch_sizes(16) == [16]
    for bad in ("", "2.5", "0", "-4"):
        with pytest.raises(SppError):
            commands.parse_batch_sizes(bad)

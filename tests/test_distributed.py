"""Recording across processes: 2 CPU ranks (gloo on 127.0.0.1) merge to exactly what one process records.

Which equality holds: every micro-batch goes through the model on its own, so per micro-batch the activations
are the same whichever rank runs it; the merge is Chan's exact update. Hence a sharded run equals a single
process over the same micro-batches, for NF models (no batch-dependent layer) and for BatchNorm in train mode
alike (there it equals the single process over the same micro-batches, not over one big batch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import spp.hooks
from spp import distributed
from spp.files import load_record, save_record
from spp.models import create_model
from spp.run import RunConfig, record_run

ROOT = Path(__file__).resolve().parent.parent
STATS = ("avg_sq_mean", "avg_var", "res_avg_var", "grad_avg_sq_mean", "grad_avg_var", "grad_res_avg_var")


@pytest.fixture(autouse=True)
def one_thread():
    """Ranks run one thread each; so does the single process they are compared with (same conv kernels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def assert_same_stats(a, b, rel: float = 1e-6) -> None:
    assert [r["name"] for r in a.rows] == [r["name"] for r in b.rows]
    assert [r["count"] for r in a.rows] == [r["count"] for r in b.rows]
    for ra, rb in zip(a.rows, b.rows, strict=True):
        for key in STATS:
            if ra[key] == ra[key]:  # NaN (the stem's residual) on both sides otherwise
                assert abs(rb[key] - ra[key]) <= rel * abs(ra[key]), f"{ra['name']} {key}: {rb[key]} vs {ra[key]}"
            else:
                assert rb[key] != rb[key]


CONFIGS = {
    # 5 micro-batches over 2 ranks: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
    "nf": RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, num_samples=18,
                    batch_size=4, seed=3),
    "bn_train": RunConfig(model="bn_relu_resnet50", model_kwargs={"width": 0.125}, resolution=32, num_samples=12,
                          batch_size=4, seed=1, mode="train"),
    # --grad: each rank's gradient moments merge too, and micro-batch j draws the loss's g from (seed, j) on any
    # rank, so the gradients are those of one process
    "nf_grad": RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, num_samples=10,
                         batch_size=4, seed=3, grad=True),
    # one micro-batch: rank 1 records nothing and still gets the merged record
    "one_batch": RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, batch_size=4),
}


def _record_worker(rank: int, world: int, port: int, names: list[str], out: str) -> None:
    os.environ.update(dist_env(rank, world, port))
    torch.set_num_threads(1)
    for name in names:
        rec = record_run(CONFIGS[name])
        save_record(rec, os.path.join(out, f"{name}-rank{rank}.json"))
        assert distributed.current().world_size == world


def _recorder_worker(rank: int, world: int, port: int, out: str) -> None:
    """The library path: a SignalRecorder per rank on its own micro-batches, then merge_moments."""
    os.environ.update(dist_env(rank, world, port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(j)) for j in range(4)]
    with spp.hooks.SignalRecorder(model, mode="eval") as rec, torch.no_grad():
        for j in range(rank, len(batches), world):
            model(batches[j])
    distributed.merge_moments(rec)
    save_record(rec.snapshot(), os.path.join(out, f"recorder-rank{rank}.json"))
    outputs = [o for o, _ in rec.moments()]
    torch.save({"count": [o.count for o in outputs], "mean": [o.mean.clone() for o in outputs]},
               os.path.join(out, f"state-rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_record_worker, args=(2, free_port(), list(CONFIGS), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process(two_rank_records, name):
    single = record_run(CONFIGS[name])
    r0 = load_record(two_rank_records / f"{name}-rank0.json")
    r1 = load_record(two_rank_records / f"{name}-rank1.json")
    assert_same_stats(single, r0)
    assert_same_stats(r0, r1, rel=0.0)  # every rank holds the merged record, bit for bit
    assert r0.settings["samples"] == single.settings["samples"]
    assert r0.settings["batches"] == single.settings["batches"]
    assert r0.settings["world_size"] == 2 and "world_size" not in single.settings


def test_merge_moments_from_signal_recorders(tmp_path):
    mp.start_processes(_recorder_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    torch.manual_seed(0)
    model = create_model("nf_resnet50", width=0.125)
    batches = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(j)) for j in range(4)]
    single = spp.hooks.record(model, batches, mode="eval")
    merged = load_record(tmp_path / "recorder-rank0.json")
    assert_same_stats(single, merged)
    assert merged.settings["samples"] == 12 and merged.settings["batches"] == 4
    s0 = torch.load(tmp_path / "state-rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "state-rank1.pt", weights_only=True)
    assert s0["count"] == s1["count"]
    assert all(torch.equal(a, b) for a, b in zip(s0["mean"], s1["mean"], strict=True))


def test_shards_partition_the_micro_batches():
    ctxs = [distributed.Context(rank=r, world_size=3) for r in range(3)]
    shards = [c.shard(10) for c in ctxs]
    assert sorted(j for s in shards for j in s) == list(range(10))
    assert shards[0] == [0, 3, 6, 9] and shards[2] == [2, 5, 8]


def test_single_process_is_not_distributed(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.init_from_env()
    assert not ctx.active and ctx.is_main and distributed.is_main_process()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    rec = spp.hooks.SignalRecorder(create_model("nf_resnet50", width=0.125))
    distributed.merge_moments(rec)  # a no-op without a process group


def test_bad_environment_is_one_line_error(monkeypatch):
    from spp.errors import SppError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(SppError, match="RANK 5 of WORLD_SIZE 2"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SppError, match="torchrun"):
        distributed.init_from_env()


def test_torchrun_cli_writes_once_and_matches(tmp_path):
    """``torchrun --nproc-per-node 2 -m spp record``: rank 0 writes the file, equal to a single-process run."""
    out = tmp_path / "rec.json"
    args = ["--model", "nf_resnet50", "--width", "0.125", "--resolution", "32", "--num-samples", "12",
            "--batch-size", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "spp", "record",
                          *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (run.stdout + run.stderr).count("wrote") == 1  # rank 1 prints nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]
    merged = json.loads(out.read_text())
    assert merged["settings"]["world_size"] == 2
    cfg = RunConfig(model="nf_resnet50", model_kwargs={"width": 0.125}, resolution=32, num_samples=12,
                    batch_size=4)
    assert_same_stats(record_run(cfg), load_record(out))


def test_a_rank_started_alone_fails_in_one_line_on_every_rank(tmp_path):
    """A launch where the other rank never comes: rank 0 waits SPP_DIST_TIMEOUT (1 s) for it, rank 1 (started
    against a port nobody listens on) as long for rank 0; each says so in one line, prefixed with its rank (a rank
    other than 0 prints its error too), and exits 2 instead of waiting torch's 30 minutes. No C++ frames leak."""
    args = [sys.executable, "-m", "spp", "record", "-m", "nf_resnet50", "--width", "0.0625", "--resolution", "32",
            "--batch-size", "2"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **dist_env(rank, 2, free_port()), "SPP_DIST_TIMEOUT": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([*args, "-o", str(tmp_path / f"r{rank}.json")], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        lines = [line for line in out.splitlines() if line.strip()]
        assert proc.returncode == 2, out
        assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank}: "), out
        assert "within 1 s" in lines[0] and "torchrun" in lines[0]
    assert not list(tmp_path.iterdir())

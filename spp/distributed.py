"""Recording across processes: each rank records its shard of the micro-batches, the moments merge exactly.

With ``torchrun --nproc-per-node N -m spp record ...`` (or ``plot`` / ``compare``) every process runs the same
command: ``init_from_env`` sees torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, starts the default
process group (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``), the model is built identically on
every rank (the seed is set before building), rank ``r`` records micro-batches ``r, r + N, r + 2N, ...``
(Gaussian micro-batch ``j`` is drawn from ``(seed, j)`` whatever the number of ranks), and ``merge_moments``
all-gathers every tap's (count, mean, M2) and merges them with Chan's update in rank order: the statistics one
process would compute on all the samples (up to float64 rounding of the merge order). Only rank 0 writes files
and prints.

In a training script (DDP, FSDP), hook as usual and merge before the snapshot::

    with spp.hooks.SignalRecorder(model) as rec:      # on every rank
        model(x_local)
    spp.distributed.merge_moments(rec)                # a collective: every rank calls it
    if spp.distributed.is_main_process():
        rec.snapshot().to_frame()

Under FSDP the parameters are sharded but each rank's activations are its own full tensors, so hooks on block
modules see complete per-sample activations; name the blocks as ``named_modules`` shows them, e.g.
``--blocks '*layers.*'`` matching the ``_fsdp_wrapped_module`` prefixes (FSDP1) or the plain names (FSDP2).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spp.errors import SppError, one_line
from spp.moments import ChannelMoments, MergeItem, accumulation_dtype, merge_many

ENV_VARS = ("WORLD_SIZE", "RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` (1 and 0 outside a distributed run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, num_batches: int) -> list[int]:
        """The micro-batch indices this rank records: rank, rank + world_size, ..."""
        return list(range(self.rank, num_batches, self.world_size))


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text, 10)
    except ValueError:
        raise SppError(f"bad distributed environment: {name}={text!r} is not a whole number; unset it, or start "
                       "spp with torchrun") from None


def env_context() -> Context:
    """The rank / world size torchrun (or any launcher setting WORLD_SIZE and RANK) gave this process.

    A variable set without a launcher (RANK without WORLD_SIZE, a rank outside the world, text) is one line at once,
    never a hang waiting for processes that will not come.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1:
        raise SppError(f"bad distributed environment: WORLD_SIZE {world}; it must be at least 1")
    if not 0 <= rank < world:
        unset = " (WORLD_SIZE is not set: was spp started by a launcher?)" if "WORLD_SIZE" not in os.environ else ""
        raise SppError(f"bad distributed environment: RANK {rank} of WORLD_SIZE {world}{unset}; start spp with "
                       "torchrun, or unset RANK")
    if local < 0:
        raise SppError(f"bad distributed environment: LOCAL_RANK {local} is negative")
    return Context(rank, world, local)


def current() -> Context:
    """The initialised default process group's view, else the environment's (not yet initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), env_context().local_rank)
    return env_context()


def is_main_process() -> bool:
    """True outside a distributed run, and on rank 0 inside one: the process that writes and prints."""
    return current().is_main


def local_device(spec: str) -> str:
    """``cuda`` (no index) under torchrun means this rank's own GPU, ``cuda:LOCAL_RANK``."""
    ctx = env_context()
    if ctx.active and spec == "cuda":
        return f"cuda:{ctx.local_rank}"
    return spec


def init_from_env(device: torch.device | None = None) -> Context:
    """Start the default process group from torchrun's environment, once; a no-op in a single process.

    Backend: nccl when ``device`` is CUDA, gloo otherwise. A group someone else started is used as it is.
    """
    import torch.distributed as dist

    ctx = env_context()
    if not ctx.active:
        return ctx
    if not dist.is_available():
        raise SppError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return current()
    if not os.environ.get("MASTER_ADDR", "").strip() or "MASTER_PORT" not in os.environ:
        raise SppError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: start spp with torchrun, "
                       "e.g. torchrun --nproc-per-node 2 -m spp record ...")
    port = _env_int("MASTER_PORT", 0)
    if not 1 <= port <= 65535:
        raise SppError(f"bad distributed environment: MASTER_PORT {port} is not a port (1 to 65535)")
    store = _rendezvous(ctx, os.environ["MASTER_ADDR"].strip(), port)
    kwargs: dict[str, Any] = {"backend": "gloo"}
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs = {"backend": "nccl", "device_id": device}
    try:
        dist.init_process_group(store=store, rank=ctx.rank, world_size=ctx.world_size, **kwargs)
    except Exception as exc:
        raise SppError(f"rank {ctx.rank}: could not start the {kwargs['backend']} process group: "
                       f"{one_line(exc, 200)}") from None
    atexit.register(_shutdown)
    return current()


TIMEOUT_ENV = "SPP_DIST_TIMEOUT"
DEFAULT_RENDEZVOUS_SECONDS = 60.0


def rendezvous_timeout() -> float:
    """How long the ranks wait for each other to start (``$SPP_DIST_TIMEOUT`` seconds, default 60): a rank started
    without the others fails after this, in one line, instead of waiting for torch's 30 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_RENDEZVOUS_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise SppError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return seconds


def _rendezvous(ctx: Context, host: str, port: int) -> Any:
    """The ranks meet at rank 0's TCP store within ``rendezvous_timeout()``; then the store waits as long as
    torch's collectives do (a slow rank is not a broken launch)."""
    from datetime import timedelta

    import torch.distributed as dist

    from spp.loading import native_stderr

    seconds = rendezvous_timeout()
    try:
        with native_stderr():  # c10d prints C++ frames on each retry: the one line below says it all
            store = dist.TCPStore(host, port, ctx.world_size, ctx.rank == 0, timedelta(seconds=seconds),
                                  wait_for_workers=True)
    except Exception as exc:
        who = (f"the other {ctx.world_size - 1} rank(s) did not join rank 0 at {host}:{port}" if ctx.rank == 0
               else f"could not reach rank 0 at {host}:{port}")
        raise SppError(f"rank {ctx.rank}: {who} within {seconds:g} s ({one_line(exc, 120)}); were all "
                       f"{ctx.world_size} ranks started by torchrun with the same MASTER_ADDR / MASTER_PORT? "
                       f"({TIMEOUT_ENV} sets the wait)") from None
    store.set_timeout(timedelta(minutes=30))
    return store


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class MomentSource(Protocol):
    """What ``merge_moments`` merges: a recorder's per-tap (output, residual) moments and its sample counts."""

    samples: int
    batches: int

    def moments(self) -> list[tuple[ChannelMoments, ChannelMoments]]: ...


def _collective_device(moments: Iterable[ChannelMoments]) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    for m in moments:
        if m.mean is not None and m.mean.device.type == "cpu":
            return m.mean.device
    return torch.device("cpu")


def merge_moments(recorder: MomentSource, group: Any = None) -> None:
    """All-gather every tap's (count, mean, M2) and merge them in rank order into ``recorder`` on every rank: the
    stream's and the branch's, and their gradients' where the recorder has ``gradient_moments`` (``grad=True``).

    A collective: every rank of ``group`` (default: the whole world) must call it, with a recorder over the same
    model (same taps). A rank that saw no micro-batch contributes nothing. Afterwards ``recorder.snapshot()`` is
    the same on every rank: the statistics over all ranks' samples. ``samples`` and ``batches`` are summed.
    A no-op without an initialised process group of more than one rank.
    """
    pairs = recorder.moments()
    moments = [*(o for o, _ in pairs), *(r for _, r in pairs)]
    gradients = getattr(recorder, "gradient_moments", None)  # a SignalRecorder's gradients (empty without grad)
    if gradients is not None:
        grad_pairs = gradients()
        moments += [*(o for o, _ in grad_pairs), *(r for _, r in grad_pairs)]
    recorder.samples, recorder.batches = merge_across_ranks(moments, recorder.samples, recorder.batches, group,
                                                            taps=len(pairs))


def merge_across_ranks(moments: list[ChannelMoments], samples: int, batches: int,
                       group: Any = None, taps: int | None = None) -> tuple[int, int]:
    """Merge each of ``moments`` with the same-position moments of every other rank, in rank order, in place;
    returns (samples, batches) summed over the ranks. A collective (see ``merge_moments``). ``taps``: the
    moments are lists of this many taps one after the other (for the tap number in an error)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return samples, batches
    world = dist.get_world_size(group)
    device = _collective_device(moments)
    # 1. counts and channel counts (a rank that saw nothing does not know the shapes), samples, batches
    meta = torch.tensor([len(moments), samples, batches,
                         *(m.count for m in moments),
                         *((m.mean.numel() if m.mean is not None else 0) for m in moments)], dtype=torch.int64,
                        device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas_host = [t.cpu().tolist() for t in metas]
    if any(m[0] != len(moments) for m in metas_host):
        raise SppError(f"ranks recorded different models: tap counts {[m[0] for m in metas_host]}")
    k = len(moments)
    channels = [max(m[3 + k + i] for m in metas_host) for i in range(k)]
    for row in metas_host:
        for i in range(k):
            if row[3 + k + i] not in (0, channels[i]):
                raise SppError(f"ranks disagree on the channels of tap {i % (taps or k)}: "
                               f"{[x[3 + k + i] for x in metas_host]}")
    # 2. the moments, flat, in float64: means then M2s of every tap (zeros where a rank has none)
    acc = accumulation_dtype(device)
    parts = []
    for mom, c in zip(moments, channels, strict=True):
        if mom.count and mom.mean is not None and mom.m2 is not None:
            parts += [mom.mean.detach().to(device, acc).reshape(-1), mom.m2.detach().to(device, acc).reshape(-1)]
        else:
            parts += [torch.zeros(c, dtype=acc, device=device), torch.zeros(c, dtype=acc, device=device)]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=device)
    flats = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(flats, flat, group=group)
    # 3. merge in rank order, exactly as one stream: rank 0's moments, then rank 1's, ...
    home = [m.mean.device if m.mean is not None else None for m in moments]
    merged = [ChannelMoments() for _ in moments]
    for r in range(world):
        pieces = flats[r].split([c for c in channels for _ in (0, 1)])
        items: list[MergeItem] = []
        for i in range(k):
            n = metas_host[r][3 + i]
            if n:
                items.append((merged[i], n, pieces[2 * i], pieces[2 * i + 1]))
        merge_many(items)
    for mom, target, dev in zip(moments, merged, home, strict=True):
        mom.assign(target, dev if dev is not None else device)
    return sum(row[1] for row in metas_host), sum(row[2] for row in metas_host)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (plain data: a Record, a flag); ``obj`` itself outside a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]

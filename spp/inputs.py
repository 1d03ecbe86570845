"""Input micro-batches: Gaussian N(0, std^2) drawn lazily, reproducible per (seed, batch index)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from spp.errors import SppError


@dataclass(frozen=True)
class GaussianInput:
    """``num_samples`` samples of shape ``shape`` (C, H, W), in micro-batches of ``batch_size``.

    Micro-batch j is drawn from its own generator seeded with (seed, j), so any subset of the batches (one
    process's shard) reproduces exactly the samples a single process would see.
    """

    shape: tuple[int, ...]
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_samples < 1:
            raise SppError("--batch-size and --num-samples must be at least 1")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch(self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = min(self.batch_size, self.num_samples - j * self.batch_size)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        x = torch.randn((n, *self.shape), generator=gen)
        if self.std != 1.0:
            x.mul_(self.std)
        return x.to(device=device, dtype=dtype)

    def batches(self, indices=None, device="cpu", dtype=torch.float32) -> Iterator[torch.Tensor]:
        for j in indices if indices is not None else range(self.num_batches):
            yield self.batch(j, device, dtype)

    def describe(self) -> dict:
        return {"input": "gaussian", "input_std": self.std, "input_shape": list(self.shape),
                "num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed}

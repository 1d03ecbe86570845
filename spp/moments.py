"""Per-channel count / mean / M2, streamed over micro-batches and merged exactly (Chan et al., 1979).

A forward hook calls ``update`` with an activation: a two-pass mean / M2 over the non-channel axes in float32 or
better, then a C-sized merge on the activation's device. No activation is kept, nothing is copied to
the host until ``finalize``, and ``merge`` combines moments from other micro-batches or processes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def channel_axis(x: torch.Tensor, channel_dim: int | None) -> int:
    """The channel axis of ``x``: explicit, or 1 for (B, C), (B, C, H, W), (B, C, D, H, W); -1 for tokens (B, N, C)."""
    if channel_dim is not None:
        return channel_dim % x.ndim
    if x.ndim == 3:
        return 2
    if x.ndim < 2:
        raise ValueError(f"cannot take channel statistics of a tensor of shape {tuple(x.shape)}")
    return 1


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it cheaply (CPU, CUDA); float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


class ChannelMoments:
    """Running per-channel moments of one tap. ``count`` is a Python int, so updates never sync with the device."""

    __slots__ = ("count", "m2", "mean")

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, channel_dim: int | None = None) -> None:
        axis = channel_axis(x, channel_dim)
        dims = tuple(d for d in range(x.ndim) if d != axis)
        n = x.numel() // x.shape[axis]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half / bfloat16 / int: statistics in float32 at least
        # Two-pass (mean, then squared deviations): exact where sum-of-squares cancels, and on CPU several times
        # faster than torch.var_mean over non-contiguous axes. One transient tensor the size of x, freed at once.
        mean = x.mean(dim=dims, keepdim=True)
        m2 = (x - mean).square_().sum(dim=dims)
        acc = accumulation_dtype(x.device)
        self._merge(n, mean.reshape(-1).to(acc), m2.to(acc))

    def merge(self, other: ChannelMoments) -> None:
        if other.count:
            self._merge(other.count, other.mean.to(self.mean.device if self.mean is not None else other.mean.device),
                        other.m2.to(self.m2.device if self.m2 is not None else other.m2.device))

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"channel count changed between batches: {self.mean.shape[0]} then {mean_b.shape[0]}")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.count = n

    def finalize(self) -> Summary:
        """Move to the host once and reduce to the SPP scalars."""
        if self.count == 0:
            return Summary(0, float("nan"), float("nan"), 0, 0)
        mean = self.mean.detach().to("cpu", torch.float64)
        var = self.m2.detach().to("cpu", torch.float64) / self.count
        nonfinite = int((~torch.isfinite(mean) | ~torch.isfinite(var)).sum())
        return Summary(
            count=self.count,
            avg_sq_mean=float((mean * mean).mean()),
            avg_var=float(var.mean()),
            channels=int(mean.numel()),
            nonfinite_channels=nonfinite,
        )

    def state(self) -> dict:
        """Plain tensors for saving or for ``torch.distributed`` collectives."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> ChannelMoments:
        m = cls()
        m.count, m.mean, m.m2 = int(state["count"]), state["mean"], state["m2"]
        return m


@dataclass(frozen=True)
class Summary:
    count: int  # values per channel
    avg_sq_mean: float
    avg_var: float
    channels: int
    nonfinite_channels: int

"""The SPP statistics computed the obvious way, in float64, to check the streaming recorder against."""

from __future__ import annotations

import torch


def direct_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """(avg channel squared mean, avg channel population variance) of ``x``, reducing every non-channel axis."""
    x = x.detach().double().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    mean = x.mean(dim=1)
    var = ((x - mean[:, None]) ** 2).mean(dim=1)
    return float((mean**2).mean()), float(var.mean())


def capture(model: torch.nn.Module, names: list[str], inputs) -> dict[str, list[torch.Tensor]]:
    """Outputs of the named modules over every batch in ``inputs``, with hooks that are removed afterwards."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(out.detach().clone())) for n in names
    ]
    try:
        with torch.no_grad():
            for batch in inputs:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_close(actual: float, expected: float, rel: float, what: str = "") -> None:
    assert abs(actual - expected) <= rel * abs(expected), f"{what}: {actual} vs {expected} (rel tol {rel})"

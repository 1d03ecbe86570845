"""Shared by the family / loading tests: capture tap tensors with our own hooks, direct channel statistics,
and toy blocks for the traced fallback. Kept out of conftest.py so other test modules are not affected."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spp.taps import Difference, Site, Tap


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module: tiny convs on a shared 2-core machine run faster on one thread (restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next(v for v in value if isinstance(v, torch.Tensor))
    raise TypeError(type(value))


def tap_sites(taps: Iterable[Tap]) -> set[Site]:
    """Every site a tap reads, plus each block's input (to rebuild the shortcut)."""
    sites: set[Site] = set()
    for t in taps:
        sites.add(t.output)
        sites.add(Site(t.module, "input"))
        if isinstance(t.residual, Site):
            sites.add(t.residual)
        elif isinstance(t.residual, Difference):
            sites |= {t.residual.minuend, t.residual.subtrahend}
    return sites


@torch.no_grad()
def capture(model: nn.Module, sites: Iterable[Site], *args, **kwargs) -> dict[Site, torch.Tensor]:
    """Run ``model`` once and return a clone of the tensor at every site (clones: blocks add in place)."""
    modules = dict(model.named_modules())
    values: dict[Site, torch.Tensor] = {}
    handles = []
    for site in set(sites):
        mod = modules[site.module]
        if site.kind == "input":

            def pre(m, a, kw, site=site):
                values.setdefault(site, first_tensor(a if a else tuple(kw.values())).detach().clone())

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(m, a, out, site=site):
                values.setdefault(site, first_tensor(out).detach().clone())

            handles.append(mod.register_forward_hook(post))
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return values


def residual_value(tap: Tap, values: dict[Site, torch.Tensor]) -> torch.Tensor:
    if isinstance(tap.residual, Difference):
        return values[tap.residual.minuend] - values[tap.residual.subtrahend]
    return values[tap.residual]


def channel_stats(x: torch.Tensor, axis: int) -> tuple[float, float]:
    """(mean over channels of the squared channel mean, mean over channels of the population variance), float64."""
    x = x.detach().to(torch.float64)
    per_channel = x.movedim(axis % x.ndim, 0).reshape(x.shape[axis], -1)
    mean = per_channel.mean(dim=1)
    var = per_channel.var(dim=1, unbiased=False)
    return float((mean * mean).mean()), float(var.mean())


@torch.no_grad()
def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero or tiny parameters (zero-init gains, 1e-6 layer scales, skip-init gains, zero biases) random values
    in [0.5, 1], so every branch contributes and a tap that reads the wrong tensor cannot hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() and float(p.abs().max()) < 1e-3:
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
    return model


# ---- toy blocks for the traced fallback ----------------------------------------------------------------------


class PreActToy(nn.Module):
    """x + branch(x): the branch is one child module."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.branch(x)


class PostActProjToy(nn.Module):
    """relu(bn(conv(x)) + proj(x)): post-activation, projection shortcut."""

    def __init__(self, cin: int = 4, cout: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + self.proj(x))


class FunctionalToy(nn.Module):
    """x + 0.5 * relu(conv(x)): no module returns the branch, so it is read as output - input."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + 0.5 * F.relu(self.conv(x))


class TwoAddToy(nn.Module):
    """Pre-norm transformer block on tokens (B, N, C): two residual additions."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScaledToy(nn.Module):
    """x + gamma * mlp(x) with gamma a Parameter: the branch is read at mlp, before the scale."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.3))

    def forward(self, x):
        return x + self.gamma * self.mlp(x)


class NotResidualToy(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return self.conv(x) * 2 + self.pos  # adds a parameter, not a function of the input


class UntraceableToy(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x + self.conv(x)
        return x - self.conv(x)


class ActAfterFunctionalToy(nn.Module):
    """relu(x + conv2d(x, w)): no module output is the branch, and output - input is not it either."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)

    def forward(self, x):
        return F.relu(x + F.conv2d(x, self.w, padding=1))


class ParallelHeadsToy(nn.Module):
    """head(x) + head_dist(x): two parallel paths of equal length, neither is a skip."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(c, c, 1)
        self.head_dist = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.head(x) + self.head_dist(x)


class NamedShortcutToy(nn.Module):
    """stack(x) + shortcut(x): equal path lengths, but the name says which one is the skip."""

    def __init__(self, cin: int = 4, cout: int = 6) -> None:
        super().__init__()
        self.stack = nn.Conv2d(cin, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.stack(x) + self.shortcut(x)


class PooledShortcutToy(nn.Module):
    """amax-pooled projection + drop_path(attn(x)) (Hiera's stage transition): the shortcut is computed
    inline and the branch hides behind an Identity named drop_path; not provable, so not claimed."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(c, c)
        self.attn = nn.Linear(c, c)
        self.drop_path = nn.Identity()

    def forward(self, x):
        pooled = self.proj(x).view(x.shape[0], 2, -1, x.shape[-1]).amax(dim=1)
        return pooled + self.drop_path(self.attn(x[:, ::2]))


class InplaceToy(nn.Module):
    """x += 0.5 * relu(conv(x)): the branch is only readable as output - input, and the add is in place."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x += 0.5 * F.relu(self.conv(x))
        return x


class Chain(nn.Module):
    """A stem conv then ``blocks`` in a Sequential (so they form one stage)."""

    def __init__(self, *blocks: nn.Module, stem: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.stem(x))

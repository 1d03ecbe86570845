"""Toy residual blocks, each a case the discovery rules (mostly the traced fallback) must claim or refuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class PostNormToy(nn.Module):
    """A post-norm block a user might write: LN(x + attn(x)) then LN(x + mlp(x)), on tokens (B, N, C)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(c, c)
        self.norm1 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.norm2 = nn.LayerNorm(c)

    def forward(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class SecondArgumentToy(nn.Module):
    """Class attention (CaiT's pattern): reads both arguments, adds into the second one."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.attn = nn.Linear(c, c)

    def forward(self, x, x_cls):
        u = torch.cat([self.norm(x_cls), x], dim=1)
        return x_cls + self.attn(u).mean(1, keepdim=True)


class TwoStreams(nn.Module):
    """Feeds a token stream and a class token through SecondArgumentToy blocks."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(c, c)
        self.blocks = nn.ModuleList([SecondArgumentToy(c), SecondArgumentToy(c)])

    def forward(self, x):
        x = self.stem(x)
        cls = x[:, :1] * 2.0
        for block in self.blocks:
            cls = block(x, cls)
        return cls


class ResScaleToy(nn.Module):
    """MetaFormer's res_scale: a Scale module on the shortcut; the branch is read at mixer, before ls."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.mixer = nn.Conv2d(c, c, 3, padding=1)
        self.res_scale = Scale(c, 0.7)
        self.ls = Scale(c, 0.3)

    def forward(self, x):
        return self.res_scale(x) + self.ls(self.mixer(x))


class Scale(nn.Module):
    """x * a per-channel parameter (NCHW)."""

    def __init__(self, c: int, value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((c, 1, 1), value) + torch.linspace(0, 0.1, c).view(c, 1, 1))

    def forward(self, x):
        return x * self.scale


class TokenMixToy(nn.Module):
    """ResMLP's token mixing: x + ls * linear_tokens(x^T)^T, the scale applied after the transpose."""

    def __init__(self, n: int = 6, c: int = 4) -> None:
        super().__init__()
        self.linear_tokens = nn.Linear(n, n)
        self.ls = nn.Parameter(torch.linspace(0.2, 1.0, c))

    def forward(self, x):
        return x + self.ls * self.linear_tokens(x.transpose(1, 2)).transpose(1, 2)


class ReshapeToy(nn.Module):
    """Swin V2 CR's pattern: the block reshapes with sizes read off x.shape around its addition."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Linear(c, c)

    def forward(self, x):
        b, h, w, c = x.shape
        y = x.reshape(b, h * w, c)
        y = y + self.mlp(self.norm(y))
        return y.view(b, h, w, c)


class NestedToy(nn.Module):
    """FastViT's pattern: the token mixer adds its own residual inside a block that adds one more."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.token_mixer = PreActToy(c)
        self.mlp = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.mlp(x)


class HeadAfterAddToy(nn.Module):
    """HRNet's pattern at the top of a model: the last addition is followed by a classifier head."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.branch = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = x + self.branch(x)
        return self.head(y.mean((2, 3)))

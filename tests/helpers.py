"""Oracles the tests check spp against, computed the obvious way and independently of spp: float64 channel
statistics, tensors captured with the tests' own hooks, and a way to make zero-init branches live."""

from __future__ import annotations

import math
from collections.abc import Iterable

import timm
import torch
import torchvision
from torch import nn

from spp import hooks
from spp.discovery import find_taps
from spp.taps import Difference, Site, Tap


def direct_stats(x: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """(avg channel squared mean, avg channel population variance) of ``x`` in float64, reducing every
    non-channel axis."""
    x = x.detach().double().movedim(channel_dim % x.ndim, 0).reshape(x.shape[channel_dim], -1)
    mean = x.mean(dim=1)
    var = ((x - mean[:, None]) ** 2).mean(dim=1)
    return float((mean**2).mean()), float(var.mean())


def assert_close(actual: float, expected: float, rel: float, what: str = "") -> None:
    assert abs(actual - expected) <= rel * abs(expected), f"{what}: {actual} vs {expected} (rel tol {rel})"


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next(v for v in value if isinstance(v, torch.Tensor))
    raise TypeError(type(value))


def capture_outputs(model: nn.Module, names: list[str], inputs) -> dict[str, list[torch.Tensor]]:
    """Outputs of the named modules over every batch in ``inputs``, with hooks that are removed afterwards."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(first_tensor(out).detach().clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            for batch in inputs:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def tap_sites(taps: Iterable[Tap]) -> set[Site]:
    """Every site a tap reads, plus each block's input (to rebuild the shortcut)."""
    sites: set[Site] = set()
    for t in taps:
        sites.add(t.output)
        sites.add(Site(t.module, "input"))
        if t.shortcut is not None:
            sites.add(t.shortcut)
        if isinstance(t.residual, Site):
            sites.add(t.residual)
        elif isinstance(t.residual, Difference):
            sites |= {t.residual.minuend, t.residual.subtrahend}
    return sites


@torch.no_grad()
def capture_sites(model: nn.Module, sites: Iterable[Site], *args, **kwargs) -> dict[Site, torch.Tensor]:
    """Run ``model`` once and return a clone of the tensor at every site (clones: blocks add in place)."""
    modules = dict(model.named_modules())
    values: dict[Site, torch.Tensor] = {}
    handles = []
    for site in set(sites):
        mod = modules[site.module]
        if site.kind == "input":

            def pre(m, a, kw, site=site):
                if isinstance(site.arg, str):
                    value = kw.get(site.arg)
                elif len(a) > site.arg:
                    value = a[site.arg]
                else:
                    value = first_tensor(tuple(kw.values())) if site.arg == 0 else None
                if isinstance(value, torch.Tensor):
                    values.setdefault(site, value.detach().clone())

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
        difference = values[tap.residual.minuend] - values[tap.residual.subtrahend]
        return difference / float(tap.residual_scale) if tap.residual_scale else difference
    assert tap.residual is not None
    return values[tap.residual]


@torch.no_grad()
def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero or tiny parameters (zero-init gains, 1e-6 layer scales, skip-init gains, zero biases) random values
    in [0.5, 1], so every branch contributes and a tap that reads the wrong tensor cannot hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() and float(p.abs().max()) < 1e-3:
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
    return model


# ---- models and taps checked against captured tensors ----------------------------------------------------


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()



def tv_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()



def image(n: int = 2, size: int = 32, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(1))



def blocks(taps):
    return taps[1:]



def check_recorder_reads_the_same(model: nn.Module, taps, values, x) -> None:
    """The recorder's statistics at every tap equal the direct ones on the tensors our own hooks captured."""
    rec = hooks.record(model, x, mode="eval", taps=taps)
    for tap, row in zip(taps, rec.rows, strict=True):
        assert row["check"] != "refused", (tap.name, row["note"])  # the recorder's own residual check agrees
        out = values[tap.output]
        declared = tap.channel_dim if tap.residual is not None else taps[1].channel_dim  # the stem: block 1's layout
        axis = declared if declared is not None else (-1 if out.ndim == 3 else 1)
        _, var = direct_stats(out, axis)
        assert math.isclose(row["avg_var"], var, rel_tol=1e-6), (tap.name, row["avg_var"], var)
        if tap.residual is not None:
            r = residual_value(tap, values)
            axis = tap.channel_dim if tap.channel_dim is not None else (-1 if r.ndim == 3 else 1)
            if getattr(tap, "residual_channel_dim", None) is not None:
                axis = tap.residual_channel_dim  # e.g. ConvNeXt's channels-last mlp under an NCHW block
            _, rvar = direct_stats(r, axis)
            assert math.isclose(row["res_avg_var"], rvar, rel_tol=1e-5, abs_tol=1e-12), (tap.name, rvar)



def verify(model: nn.Module, x: torch.Tensor, expect) -> list:
    """For every tap, ``expect(tap, block, values)`` rebuilds the tensor at the tap's output site from its branch."""
    taps = find_taps(model)
    values = capture_sites(model, tap_sites(taps), x)
    modules = dict(model.named_modules())
    for tap in blocks(taps):
        rebuilt = expect(tap, modules[tap.module], values)
        torch.testing.assert_close(rebuilt, values[tap.output], msg=lambda m, t=tap: f"{t.name}: {m}")
    check_recorder_reads_the_same(model, taps, values, x)
    return taps

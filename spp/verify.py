"""The residual identity, checked on the tensors the hooks see: ``output == act(shortcut + scale * branch)``.

A discovery rule claims where a block's stream, shortcut and branch are read; this check holds it to account on
real tensors, on the first micro-batch of every recording, so a wrong site (a neighbouring layer, a tensor after
its norm, another argument) is caught instead of plotted. ``scale`` is fitted per channel (layer scale, alpha,
skip gains are per-channel or scalar factors that the branch is read before); a branch read in another element
order (window partitions, channels-last copies) is compared per channel after sorting. Nothing here knows about
models or hooks: it takes tensors and their channel axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IdentityCheck:
    """``ok``: the identity holds; ``detail``: how (``"permuted"``, the fitted scale) or why not."""

    ok: bool
    detail: str


def _channels_last(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def _fit(r: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel least-squares scale c minimising ||r - c b|| (0 where the branch is zero)."""
    w = torch.ones_like(r) if weight is None else weight
    num = (w * r * b).sum(0)
    den = (w * b * b).sum(0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))


def _describe(c: torch.Tensor) -> str:
    mags = c.abs()
    low, high = float(mags.min()), float(mags.max())
    if abs(high - 1) < 1e-6 and abs(low - 1) < 1e-6:
        return "scale 1 (the branch is read as it is added)"
    if high - low <= 1e-6 * max(high, 1e-30):
        return f"scale {float(c[0]):.4g}"
    return f"per-channel scale {low:.3g} to {high:.3g}"


def check_residual(
    output: torch.Tensor,
    shortcut: torch.Tensor,
    branch: torch.Tensor,
    *,
    output_axis: int,
    branch_axis: int,
    post_activation: str = "",
    compute_dtype: torch.dtype = torch.float32,
) -> IdentityCheck:
    """Whether ``output == post(shortcut + c * branch)`` for a per-channel ``c``, up to the rounding of
    ``compute_dtype`` (the forward's precision). ``post_activation``: "" or "relu"."""
    o = output.detach().double()
    s = shortcut.detach().double()
    b = branch.detach().double()
    if s.numel() != o.numel():
        return IdentityCheck(False, f"the shortcut holds {s.numel()} values, the output {o.numel()}")
    s = s.reshape(o.shape)
    channels = o.shape[output_axis]
    if b.shape[branch_axis] != channels:
        return IdentityCheck(False, f"the branch has {b.shape[branch_axis]} channels, the output {channels}")
    if b.numel() != o.numel():
        return IdentityCheck(False, f"the branch holds {b.numel() // channels} values per channel, the addition "
                                    f"{o.numel() // channels} (padding or cropping between them?)")
    eps = torch.finfo(compute_dtype).eps if compute_dtype.is_floating_point else 0.0
    rounding = 32 * eps * (float(o.norm()) + float(s.norm()))
    R = _channels_last(o - s, output_axis)
    B = _channels_last(b, branch_axis)
    if post_activation == "relu":
        return _check_relu(_channels_last(o, output_axis), _channels_last(s, output_axis), B, rounding)
    if post_activation:
        return IdentityCheck(False, f"post-addition activation {post_activation!r} is not checkable")
    r_norm = float(R.norm())
    tolerance = 1e-3 * r_norm + rounding
    c = _fit(R, B)
    if float((R - B * c).norm()) <= tolerance:
        return IdentityCheck(True, _describe(c))
    if output.shape != branch.shape or output_axis != branch_axis:
        # The same values in another order (window partitions): compare each channel's sorted values.
        Rs = R.sort(0).values
        Bs = B.sort(0).values
        c_up = _fit(Rs, Bs)
        c_down = _fit(Rs, Bs.flip(0))
        err_up = (Rs - Bs * c_up).norm(dim=0)
        err_down = (Rs - Bs.flip(0) * c_down).norm(dim=0)
        err = torch.minimum(err_up, err_down)
        if float(err.norm()) <= tolerance:
            return IdentityCheck(True, f"permuted; {_describe(torch.where(err_up <= err_down, c_up, c_down))}")
    residual = float((R - B * c).norm()) / max(r_norm, 1e-300)
    return IdentityCheck(False, f"output - shortcut is not a per-channel multiple of the branch (relative "
                                f"residual {residual:.2g})")


def _check_relu(o: torch.Tensor, s: torch.Tensor, b: torch.Tensor, rounding: float) -> IdentityCheck:
    """relu(s + c b): equal to s + c b where the output is positive, at most 0 where it is 0."""
    live = (o > 0).double()
    r = (o - s) * live
    c = _fit(r, b, live)
    dead = live.sum(0) == 0  # channels relu zeroed everywhere: any c with s + c b <= 0 fits; take the one
    if bool(dead.any()):  # nearest the others' median
        ratio = -s / torch.where(b == 0, torch.ones_like(b), b)
        inf = torch.full_like(ratio, torch.inf)
        upper = torch.where(b > 0, ratio, inf).min(0).values
        lower = torch.where(b < 0, ratio, -inf).max(0).values
        typical = c[~dead].median() if bool((~dead).any()) else torch.tensor(1.0, dtype=c.dtype)
        c = torch.where(dead, torch.minimum(torch.maximum(typical, lower), upper), c)
    pre = s + b * c
    r_norm = float(r.norm())
    err_live = float(((r - b * c) * live).norm())
    above = float((pre * (1 - live)).clamp_min(0).norm())  # the sum must not be positive where relu gave 0
    tolerance = 1e-3 * r_norm + rounding
    if err_live <= tolerance and above <= tolerance + 1e-3 * float(pre.norm()):
        return IdentityCheck(True, f"relu after the addition; {_describe(c)}")
    return IdentityCheck(False, f"output is not relu(shortcut + c * branch) (relative residual "
                                f"{err_live / max(r_norm, 1e-300):.2g})")

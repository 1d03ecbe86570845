"""Per-channel moment kernels on activation shapes of the 600-layer references (64 and 224 px) and a ViT.

Candidates, each giving per-channel (mean, M2) over every axis but the channel axis:

* ``spp``: what a recorder's hook does, ``spp.moments.batch_moments``: the fast path (``channel_sums``: row sums
  and row norms, or column sums by matrix-vector products, in float32) where its cancellation guard lets it, else
  the exact path (its float64 reduction, batched over all taps once per forward, is left out of the time and in
  the error);
* ``exact``: ``spp.moments.channel_stats`` (two-pass, reductions laid out by shape);
* ``v0``: the first implementation (``x.mean(dims)``, then ``(x - mean).square_().sum(dims)``);
* ``var_mean``: ``torch.var_mean(x, dims, correction=0)`` (Welford);
* ``bn_stats``: ``torch.batch_norm_update_stats`` (BatchNorm's own stats kernel, double accumulation);
* ``sum_sq``: one pass, ``sum(x)`` and ``sum(x * x)`` (fast, but cancels when a channel's mean is large).

Times in microseconds (median, interleaved) on N(0, 1) input, and each candidate's worst relative error of a
channel's variance against float64 on that input and on one with mean 10 and std 1 (mean^2 / var = 100, what a
mean-shifted network produces; spp's guard sends it to the exact path).
"""

from __future__ import annotations

import _common
import torch

from spp.moments import ChannelMoments, merge_many

SHAPES = {
    "600-layer 64px stage 1": (8, 256, 16, 16),
    "600-layer 64px stage 2": (8, 512, 8, 8),
    "600-layer 64px stage 3": (8, 1024, 4, 4),
    "600-layer 64px stage 4": (8, 2048, 2, 2),
    "600-layer 224px stage 1": (8, 256, 56, 56),
    "600-layer 224px stage 2": (8, 512, 28, 28),
    "600-layer 224px stage 3": (8, 1024, 14, 14),
    "600-layer 224px stage 4": (8, 2048, 7, 7),
    "ViT-S tokens (B, N, C)": (8, 197, 384),
}


def candidates(x: torch.Tensor, axis: int) -> dict:
    from spp.moments import Workspace, batch_moments, channel_stats

    ws = Workspace()

    def spp():
        ws.rewind()
        return batch_moments(x, axis, ws)  # what a hook pays; the float64 reduction is batched over all taps

    dims = tuple(d for d in range(x.ndim) if d != axis)
    n = x.numel() // x.shape[axis]

    def v0():
        mean = x.mean(dim=dims, keepdim=True)
        return mean, (x - mean).square_().sum(dim=dims)

    def var_mean():
        v, m = torch.var_mean(x, dim=dims, correction=0)
        return m, v * n

    def bn_stats():
        xc = x if axis == 1 else x.reshape(-1, x.shape[axis])
        m, v = torch.batch_norm_update_stats(xc, None, None, 0.0)
        return m, v * n

    def sum_sq():
        s = x.sum(dim=dims)
        return s / n, (x * x).sum(dim=dims) - s * s / n

    return {"spp": spp, "exact": lambda: channel_stats(x, axis)[1:], "v0": v0, "var_mean": var_mean,
            "bn_stats": bn_stats, "sum_sq": sum_sq}


def errors(x: torch.Tensor, axis: int, name: str) -> float:
    """Worst relative error of a channel's variance from candidate ``name`` against float64."""
    xd = x.double().movedim(axis, 0).reshape(x.shape[axis], -1)
    ref_var = xd.var(dim=1, correction=0)
    out = candidates(x, axis)[name]()
    if name == "spp":  # (n, mean, m2) or (n, Sums, None): reduced as the recorder does after the forward
        m = ChannelMoments()
        merge_many([(m, *out)])
        out = (m.mean, m.m2)
    _, m2 = out
    return float(((m2.double() / xd.shape[1] - ref_var) / ref_var).abs().max())


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    _common.set_threads(args.threads)
    reps = args.reps or (3 if args.quick else 15)
    inner = 5 if args.quick else 20
    shapes = dict(list(SHAPES.items())[::4]) if args.quick else SHAPES
    rows = []
    for label, shape in shapes.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        axis = 2 if len(shape) == 3 else 1
        errs = {k: [errors(x, axis, k), errors(x + 10.0, axis, k)] for k in candidates(x, axis)}
        fns = candidates(x, axis)

        def looped(f):
            def run():
                for _ in range(inner):
                    f()  # results dropped at once: each call's temporaries are freed, as in a hook

            return run

        t = _common.interleaved({k: looped(f) for k, f in fns.items()}, reps)
        us = {k: v / inner * 1e6 for k, v in t.items()}
        rows.append([label, "x".join(map(str, shape)), *(us[k] for k in fns), us["spp"] / us["v0"],
                     us["spp"] / us["var_mean"], *(f"{errs[k][0]:.0e} / {errs[k][1]:.0e}" for k in fns)])
    names = list(candidates(torch.zeros(2, 2), 1))
    _common.table(
        "Per-channel moment kernels (us per call; CPU)",
        ["tensor", "shape", *(f"{k} us" for k in names), "spp/v0", "spp/var_mean", *(f"{k} err" for k in names)],
        rows,
        note=f"{_common.machine()}. err: worst relative error of a channel's variance vs float64, on N(0, 1) "
             "input / on input with mean 10, std 1.",
    )


if __name__ == "__main__":
    main()

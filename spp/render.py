"""Draw SPPs: three panels against depth, the user's curves over the reference curves; with gradient statistics
(``--grad``) a second row of three panels for the gradients, read in backward order.

Only this module imports matplotlib (with the Agg backend unless one is already chosen), so recording and the
CLI stay light until a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from spp.records import Record
from spp.schema import GRAD_STATISTICS, STATISTICS, TITLES

PANELS = tuple((key, TITLES[key]) for key in STATISTICS)
GRAD_PANELS = tuple((key, TITLES[key]) for key in GRAD_STATISTICS)
XAxis = Literal["block", "relative"]

# The references keep fixed, muted colours so a user's curve always stands out in the same way.
REFERENCE_STYLE = {
    "bn_relu": {"color": "#1f77b4", "label": "BN-ReLU-Conv"},
    "relu_bn": {"color": "#ff7f0e", "label": "ReLU-BN-Conv"},
    "nf_resnet": {"color": "#2ca02c", "label": "NF-ResNet (Scaled WS)"},
}


def _matplotlib():
    import os
    import sys

    import matplotlib

    # Agg unless pyplot is up already or a backend is asked for (Jupyter sets MPLBACKEND to its inline one).
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xs(rec: Record, x: XAxis) -> list[float]:
    blocks = [float(r["block"]) for r in rec.rows]
    if x == "relative":
        last = max(blocks[-1], 1.0)
        return [b / last for b in blocks]
    return blocks


def _reference_style(rec: Record) -> dict:
    family = str(rec.settings.get("family", ""))
    for key, style in REFERENCE_STYLE.items():
        if family.startswith(key):
            depth = rec.settings.get("depth", "")
            return {"color": style["color"], "label": f"{style['label']} {depth}".strip()}
    return {"color": "0.6", "label": rec.label}


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return bool(positive) and max(positive) / min(positive) >= 100.0


def draw(
    records: Record | Sequence[Record],
    *,
    references: Sequence[Record] = (),
    x: XAxis = "block",
    labels: Sequence[str] | None = None,
    title: str | None = None,
    axes=None,
    grad: bool | None = None,
):
    """Draw ``records`` (bold, in front) over ``references`` (thin, behind); returns the matplotlib Figure.

    Stage ends are dotted verticals in each curve's colour; a panel goes to log scale when its values span two
    decades or more; a record whose rows carry ``expected_var`` (NF-ResNets) gets a dashed theory line.
    ``grad``: a second row of three gradient panels (``draw_gradients``); None draws it when some record has a
    finite gradient statistic. ``axes``: three matplotlib Axes, or six with the gradient row.
    """
    from spp.errors import SppError

    if x not in ("block", "relative"):
        raise SppError(f"x must be 'block' or 'relative', not {x!r}")
    plt = _matplotlib()
    records = [records] if isinstance(records, Record) else list(records)
    with_grad = has_gradients(records) if grad is None else bool(grad)
    panels = len(PANELS) + (len(GRAD_PANELS) if with_grad else 0)
    if axes is None:
        rows = panels // len(PANELS)
        fig, grid = plt.subplots(rows, 3, figsize=(16, 4.6 * rows), constrained_layout=True)
        axes = list(grid.flat)
    else:
        try:  # a numpy array of Axes (plt.subplots) or any sequence of them
            axes = list(getattr(axes, "flat", axes))
        except TypeError:
            axes = [axes]
        if len(axes) == len(PANELS) and grad is None:
            with_grad, panels = False, len(PANELS)  # three Axes given: the forward panels only
        if len(axes) != panels:
            raise SppError(f"axes: need {panels} matplotlib Axes (squared mean, variance, residual variance"
                           f"{', then the same for the gradient' if with_grad else ''}), got {len(axes)}")
        fig = axes[0].figure
    labels = list(labels) if labels is not None else [r.label for r in records]
    if len(labels) != len(records):
        raise SppError(f"{len(labels)} labels for {len(records)} records")
    user_colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    user_colors = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", *user_colors]

    curves = [(rec, _reference_style(rec), False) for rec in references]
    for i, rec in enumerate(records):
        curves.append((rec, {"color": user_colors[i % len(user_colors)], "label": labels[i]}, True))

    for ax, (key, heading) in zip(axes[: len(PANELS)], PANELS, strict=True):
        values: list[float] = []
        for rec, style, is_user in curves:
            xs, ys = _xs(rec, x), rec.column(key)
            values += ys
            ax.plot(xs, ys, color=style["color"], label=style["label"], lw=2.0 if is_user else 1.2,
                    alpha=1.0 if is_user else 0.75, zorder=3 if is_user else 2)
            for end in rec.stage_ends[:-1]:
                ax.axvline(_xs(rec, x)[end], color=style["color"], ls=":", lw=0.8, alpha=0.6, zorder=1)
            if key == "avg_var" and any(math.isfinite(v) for v in rec.column("expected_var")):
                theory = rec.column("expected_var")
                values += theory
                ax.plot(xs, theory, color=style["color"], ls="--", lw=1.0, alpha=0.9, zorder=2,
                        label=f"{style['label']}: expected (beta bookkeeping)")
        if _spans_decades(values):
            ax.set_yscale("log")
            positive = [v for v in values if v > 0 and math.isfinite(v)]
            # Round-off zeros (1e-15 where the theory says 0) would squash the curves that matter: floor at 1e-6.
            ax.set_ylim(bottom=max(min(positive), max(positive) * 1e-6) / 2)
        ax.set_title(heading)
        ax.set_xlabel("relative depth" if x == "relative" else "block index (0 = stem)")
        ax.grid(alpha=0.25)
    axes[0].legend(fontsize=8, loc="best")
    if with_grad:
        draw_gradients(axes[len(PANELS) :], curves, x)
    if title:
        fig.suptitle(title)
    return fig


def has_gradients(records: Sequence[Record]) -> bool:
    """Whether some row of some record has a finite gradient statistic (a ``--grad`` record)."""
    return any(math.isfinite(float(r.get(key, math.nan))) for rec in records for r in rec.rows
               for key in GRAD_STATISTICS)


def draw_gradients(axes: Sequence, curves: Sequence[tuple[Record, dict, bool]], x: XAxis) -> None:
    """The gradient row: dL/d(stream) squared mean and variance, dL/d(branch) variance, per tap.

    The x axis runs from the last block back to the stem, the order the backward pass visits the blocks, so a
    gradient that grows towards the input (explodes) rises from left to right as an exploding forward signal does
    in the row above. Curves, stage ends and log scale as in ``draw``; records without gradients draw nothing here.
    The titles name the loss the user's records back-propagated.
    """
    losses = sorted({str(rec.settings.get("loss", "")) for rec, _, is_user in curves
                     if is_user and has_gradients([rec])} - {""})
    said = f" (loss: {', '.join(losses)})" if losses else ""
    for ax, (key, heading) in zip(axes, GRAD_PANELS, strict=True):
        values: list[float] = []
        for rec, style, is_user in curves:
            ys = [float(r.get(key, math.nan)) for r in rec.rows]
            if not any(math.isfinite(v) for v in ys):
                continue
            xs = _xs(rec, x)
            values += ys
            ax.plot(xs, ys, color=style["color"], label=style["label"], lw=2.0 if is_user else 1.2,
                    alpha=1.0 if is_user else 0.75, zorder=3 if is_user else 2)
            for end in rec.stage_ends[:-1]:
                ax.axvline(xs[end], color=style["color"], ls=":", lw=0.8, alpha=0.6, zorder=1)
        if _spans_decades(values):
            ax.set_yscale("log")
            positive = [v for v in values if v > 0 and math.isfinite(v)]
            ax.set_ylim(bottom=max(min(positive), max(positive) * 1e-6) / 2)
        if not ax.xaxis_inverted():
            ax.invert_xaxis()
        ax.set_title(heading + said, fontsize="medium" if said else None)
        where = "relative depth" if x == "relative" else "block index"
        ax.set_xlabel(f"{where}, last block \u2192 stem (backward order)")
        ax.grid(alpha=0.25)


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to ``path`` atomically (PNG/SVG/PDF by suffix): a temp file beside it, then a rename."""
    from spp.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.rsplit(".", 1)[-1].lower())
    _matplotlib().close(fig)

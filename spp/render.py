"""Draw SPPs: three panels against depth, the user's curves over the reference curves, and nothing hidden.

What a figure promises (each is tested):

* every curve is labelled by its run (``spp.labels``), references by family and depth, with "(train mode)" when a
  reference was recorded in another mode than the user's model;
* the x axis is the block index, or the relative depth (block / last block) when the curves have different
  depths (``x=None`` picks); layers with two residual branches (``branch`` "attn" / "mlp": transformers) are one
  series per branch against the layer index, not a zig-zag between the two;
* stage ends are dotted verticals in each series' colour, and the theory line (``expected_var``) is dashed; both
  have a legend entry; every panel has a y-axis label naming the column of the table;
* a panel whose values span two decades or more is drawn on a log axis. Its floor keeps the user's curves in view
  (down to 12 decades below the top; float32 round-off lies below that) and the references within 8 decades;
  a value below the floor is drawn at the floor with a ▼ marker and an exact zero with a × marker, and the panel
  says which curve and how many points. NaN / Inf points are left out and counted in the same note.
* with gradient statistics (``--grad``, ``spp.gradients``) a second row of three panels shows them, its x axis
  running from the last block back to the stem (the order of the backward pass) and its titles naming the loss.

Only this module imports matplotlib (with the Agg backend unless one is already chosen), so recording and the
CLI stay light until a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from spp.records import Record
from spp.schema import GRAD_STATISTICS, STATISTICS, TITLES

PANELS = tuple((key, TITLES[key]) for key in STATISTICS)
GRAD_PANELS = tuple((key, TITLES[key]) for key in GRAD_STATISTICS)
XAxis = Literal["block", "relative"]
X_AXES = ("block", "relative")
REFERENCE_DECADES = 8  # a log panel shows at least this many decades below its top
USER_DECADES = 12  # and the user's curves down to this many (below: float32 round-off of a zero)
BRANCH_STYLES = ("-", "-.", ":", (0, (5, 1, 1, 1)))  # one per branch of a two-branch layer: attn solid, mlp dash-dot
THEORY_STYLE = "--"
STAGE_STYLE = ":"
BELOW_MARKER, ZERO_MARKER = "v", "x"

# The references keep fixed, muted colours (by their family's place in its kind) so a user's curve always
# stands out in the same way.
REFERENCE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c")
REFERENCE_NAMES = {
    "bn_relu_resnet": "BN-ReLU-Conv", "relu_bn_resnet": "ReLU-BN-Conv", "nf_resnet": "NF-ResNet (Scaled WS)",
    "preln_transformer": "Pre-LN transformer", "postln_transformer": "Post-LN transformer",
    "nf_transformer": "NF transformer",
}
USER_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#000000")


def _matplotlib():
    import os
    import sys

    import matplotlib

    # Agg unless pyplot is up already or a backend is asked for (Jupyter sets MPLBACKEND to its inline one).
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- series: what one record contributes to a panel ------------------------------------------------------------


@dataclass
class Series:
    """One line of a panel: ``rows`` of a record (one branch of a two-branch model, or all its rows), drawn at
    ``positions`` (block or layer index), in ``style``."""

    record: Record
    label: str
    rows: list[dict[str, Any]]
    positions: list[float]
    color: str
    user: bool
    linestyle: Any = "-"
    stage_positions: list[float] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r.get(key, math.nan)) for r in self.rows]


def branches(rec: Record) -> list[str]:
    """The branch names of a record's layers in order of appearance ([] when every layer has one branch)."""
    seen: list[str] = []
    for r in rec.rows:
        b = str(r.get("branch") or "")
        if b and b not in seen:
            seen.append(b)
    return seen


def positions_of(rec: Record) -> tuple[str, list[float]]:
    """("block" or "layer", each row's position): the layer index for two-branch records, else the block index."""
    if branches(rec):
        return "layer", [float(r.get("layer", r["block"])) for r in rec.rows]
    return "block", [float(r["block"]) for r in rec.rows]


def depth_of(rec: Record) -> float:
    """The last position of a record (its number of blocks, or of layers for two-branch records)."""
    _, pos = positions_of(rec)
    return max(pos) if pos else 0.0


def default_x(records: Sequence[Record]) -> XAxis:
    """"block" when every record has the same depth, else "relative"."""
    return "block" if len({depth_of(r) for r in records}) <= 1 else "relative"


def _series_of(rec: Record, label: str, color: str, user: bool, x: XAxis) -> list[Series]:
    _, pos = positions_of(rec)
    last = max(max(pos, default=1.0), 1.0)
    scale = (lambda v: v / last) if x == "relative" else (lambda v: v)
    ends = sorted({scale(pos[e]) for e in rec.stage_ends[:-1] if 0 <= e < len(pos)})
    names = branches(rec)
    if not names:
        return [Series(rec, label, list(rec.rows), [scale(p) for p in pos], color, user, "-", ends)]
    out = []
    for i, name in enumerate(names):
        picked = [(p, r) for p, r in zip(pos, rec.rows, strict=True) if not r.get("branch") or r["branch"] == name]
        out.append(Series(rec, f"{label} · {name}", [r for _, r in picked], [scale(p) for p, _ in picked], color,
                          user, BRANCH_STYLES[i % len(BRANCH_STYLES)], ends if i == 0 else []))
    return out


def reference_label(rec: Record, user_mode: str | None) -> str:
    """"BN-ReLU-Conv 600", plus "(train mode)" when the reference ran in another mode than the user's model."""
    family = str(rec.settings.get("family", ""))
    name = REFERENCE_NAMES.get(family)
    label = f"{name} {rec.settings.get('depth', '')}".strip() if name else rec.label
    mode = rec.settings.get("mode")
    if user_mode is not None and mode is not None and mode != user_mode:
        label += f" ({mode} mode)"
    return label


def _reference_color(rec: Record, i: int) -> str:
    from spp.models import reference_families

    family = str(rec.settings.get("family", ""))
    for kind in ("resnet", "transformer"):
        families = reference_families(kind)
        if family in families:
            return REFERENCE_COLORS[families.index(family) % len(REFERENCE_COLORS)]
    return ("0.35", "0.55", "0.7")[i % 3]


# ---- log panels ------------------------------------------------------------------------------------------------


def _finite_positive(values: Sequence[float]) -> list[float]:
    return [v for v in values if v > 0 and math.isfinite(v)]


def spans_decades(values: Sequence[float]) -> bool:
    positive = _finite_positive(values)
    return bool(positive) and max(positive) / min(positive) >= 100.0


def log_floor(user_values: Sequence[float], all_values: Sequence[float]) -> float:
    """The bottom of a log panel: see the module docstring (references within ``REFERENCE_DECADES`` of the top,
    the user's curves within ``USER_DECADES``), halved for a margin."""
    every = _finite_positive(all_values)
    top = max(every)
    floor = max(min(every), top * 10.0 ** -REFERENCE_DECADES)
    mine = _finite_positive(user_values)
    if mine and min(mine) < floor:
        floor = max(min(mine), top * 10.0 ** -USER_DECADES)
    return floor / 2


def _format(v: float) -> str:
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


# ---- the figure ------------------------------------------------------------------------------------------------


def draw(
    records: Record | Sequence[Record],
    *,
    references: Sequence[Record] = (),
    x: XAxis | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    axes=None,
    notes: list[str] | None = None,
    grad: bool | None = None,
):
    """Draw ``records`` (bold, in front) over ``references`` (thin, behind); returns the matplotlib Figure.

    ``x``: "block", "relative", or None for ``default_x`` over every curve drawn. ``labels``: one per record
    (default: the records' labels, made distinct). ``notes``: a list that receives what the panels say about
    clipped, zero and non-finite points (also written in the panels). ``grad``: a second row of three gradient
    panels; None draws it when some record has a finite gradient statistic. ``axes``: three matplotlib Axes, or
    six with the gradient row. See the module docstring.
    """
    from spp.errors import SppError
    from spp.labels import distinct_labels

    if x is not None and x not in X_AXES:
        raise SppError(f"x must be 'block' or 'relative', not {x!r}")
    plt = _matplotlib()
    records = [records] if isinstance(records, Record) else list(records)
    references = list(references)
    if not records:
        raise SppError("nothing to draw: no record")
    with_grad = has_gradients(records) if grad is None else bool(grad)
    if axes is None:
        rows = 2 if with_grad else 1
        fig, grid = plt.subplots(rows, 3, figsize=(17, 5.2 * rows), layout="constrained")
        axes = list(grid.flat)
    else:
        try:  # a numpy array of Axes (plt.subplots) or any sequence of them
            axes = list(getattr(axes, "flat", axes))
        except TypeError:
            axes = [axes]
        if len(axes) == len(PANELS) and grad is None:
            with_grad = False  # three Axes given: the forward panels only
        need = len(PANELS) + (len(GRAD_PANELS) if with_grad else 0)
        if len(axes) != need:
            raise SppError(f"axes: need {need} matplotlib Axes (squared mean, variance, residual variance"
                           f"{', then the same for the gradient' if with_grad else ''}), got {len(axes)}")
        fig = axes[0].figure
    if labels is None:
        labels, _ = distinct_labels([r.label for r in records], [r.settings for r in records])
    labels = list(labels)
    if len(labels) != len(records):
        raise SppError(f"{len(labels)} labels for {len(records)} records")
    x = x or default_x([*records, *references])
    user_mode = records[0].settings.get("mode")

    series: list[Series] = []
    for i, rec in enumerate(references):
        series += _series_of(rec, reference_label(rec, user_mode), _reference_color(rec, i), False, x)
    for i, rec in enumerate(records):
        series += _series_of(rec, labels[i], USER_COLORS[i % len(USER_COLORS)], True, x)

    handles: dict[str, Any] = {}
    said: list[str] = []
    theory = stage = False
    for ax, (key, heading) in zip(axes[: len(PANELS)], PANELS, strict=True):
        drew_theory, drew_stage = _panel(ax, key, heading, series, x, handles, said)
        theory, stage = theory or drew_theory, stage or drew_stage
    if with_grad:
        with_gradients = [s for s in series if any(math.isfinite(v) for k in GRAD_STATISTICS for v in s.values(k))]
        losses = sorted({str(s.record.settings.get("loss") or "") for s in with_gradients if s.user} - {""})
        loss = f" (loss: {', '.join(losses)})" if losses else ""
        for ax, (key, heading) in zip(axes[len(PANELS):], GRAD_PANELS, strict=True):
            _, drew_stage = _panel(ax, key, heading + loss, with_gradients, x, handles, said, backward=True)
            stage = stage or drew_stage
    users = [k for k in handles if any(one.user and one.label == k for one in series)]
    entries = [(k, handles[k]) for k in users] + [(k, h) for k, h in handles.items() if k not in users]
    if theory:
        entries.append(("expected variance (theory)", _proxy(plt, THEORY_STYLE)))
    if stage:
        entries.append(("stage ends (in each curve's colour)", _proxy(plt, STAGE_STYLE)))
    if any("▼" in n for n in said):
        entries.append(("below the log floor, drawn at it", _proxy(plt, "", BELOW_MARKER)))
    if any("×" in n for n in said):
        entries.append(("exactly 0 (log axis), drawn at the floor", _proxy(plt, "", ZERO_MARKER)))
    fig.legend([h for _, h in entries], [label for label, _ in entries], loc="outside lower center",
               ncol=min(4, len(entries)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    if notes is not None:
        notes += said
    return fig


def has_gradients(records: Sequence[Record]) -> bool:
    """Whether some row of some record has a finite gradient statistic (a ``--grad`` record)."""
    return any(math.isfinite(float(r.get(key, math.nan))) for rec in records for r in rec.rows
               for key in GRAD_STATISTICS)


def _panel(ax, key: str, heading: str, series: Sequence[Series], x: XAxis, handles: dict[str, Any],
           said: list[str], *, backward: bool = False) -> tuple[bool, bool]:
    """Column ``key`` of every series on one panel: log axis and floor, markers and notes, theory line (variance
    panel), stage ends. ``backward`` (a gradient panel): the x axis runs from the last block to the stem, the
    order of the backward pass, so a gradient growing towards the input rises left to right as an exploding
    forward signal does in the row above. Returns (theory line drawn, stage ends drawn)."""
    panel_notes: list[str] = []
    theory_here = key == "avg_var"
    theory = stage = False
    every = [v for s in series for v in s.values(key)]
    if theory_here:
        every += [v for s in series for v in s.values("expected_var")]
    mine = [v for s in series if s.user for v in s.values(key)]
    log = spans_decades(every)
    floor = log_floor(mine, every) if log else None
    for s in series:
        line = _plot(ax, s, key, floor, panel_notes, s.user)
        handles.setdefault(s.label, line)
        stage = _stage_lines(ax, s) or stage
        if theory_here and any(math.isfinite(v) for v in s.values("expected_var")):
            _plot(ax, s, "expected_var", floor, [], s.user, theory=True)
            theory = True
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_title(heading, fontsize="medium" if backward else None)
    ax.set_ylabel(key + (" (log scale)" if log else ""))
    if backward:
        if not ax.xaxis_inverted():
            ax.invert_xaxis()
        ax.set_xlabel(_xlabel(series, x).split(" (")[0] + ", last → stem (backward order)")
    else:
        ax.set_xlabel(_xlabel(series, x))
    ax.grid(alpha=0.25)
    if panel_notes:
        text = "\n".join(_wrap(n) for n in panel_notes)
        (x0, y0), align = _quiet_corner(ax, text.count("\n") + 1)
        ax.text(x0, y0, text, transform=ax.transAxes, fontsize=7.5, zorder=10, multialignment="left", **align,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7", "boxstyle": "round,pad=0.3"})
        said += [f"{heading}: {n}" for n in panel_notes]
    return theory, stage


def _plot(ax, s: Series, key: str, floor: float | None, panel_notes: list[str], user: bool, *,
          theory: bool = False):
    """Column ``key`` of one series on one panel; on a log panel the points below ``floor`` go to the floor with a
    marker, and the panel's notes say so."""
    m = math
    ys = s.values(key)
    xs = s.positions
    width = 2.0 if user else 1.2
    style: dict[str, Any] = {"color": s.color, "lw": 1.0 if theory else width, "alpha": 1.0 if user else 0.75,
                             "zorder": 3 if user else 2, "ls": THEORY_STYLE if theory else s.linestyle}
    # the stem has no residual branch: its res_avg_var is NaN by definition, not a NaN/Inf to report
    undefined = [key in ("res_avg_var", "grad_res_avg_var") and not r.get("residual_site") for r in s.rows]
    bad = sum(1 for v, skip in zip(ys, undefined, strict=True) if not m.isfinite(v) and not skip)
    drawn = [v if m.isfinite(v) else m.nan for v in ys]
    if floor is not None:
        zeros = [i for i, v in enumerate(drawn) if v == 0.0]
        below = [i for i, v in enumerate(drawn) if m.isfinite(v) and 0.0 < v < floor]
        negative = [i for i, v in enumerate(drawn) if m.isfinite(v) and v < 0.0]
        clipped = set(zeros + below + negative)
        drawn = [floor if i in clipped else v for i, v in enumerate(drawn)]
        if not theory:
            if below or negative:
                ax.plot([xs[i] for i in below + negative], [floor] * len(below + negative), BELOW_MARKER,
                        color=s.color, ms=5, zorder=4, clip_on=False, label=f"_below {s.label}")
                low = min([ys[i] for i in below], default=0.0)
                panel_notes.append(f"▼ {s.label}: {len(below) + len(negative)} point(s) below {_format(floor)}"
                                   + (f" (down to {low:.1e})" if below else "") + ", drawn at the floor")
            if zeros:
                ax.plot([xs[i] for i in zeros], [floor] * len(zeros), ZERO_MARKER, color=s.color, ms=5, zorder=4,
                        clip_on=False, label=f"_zero {s.label}")
                every = " (every point)" if len(zeros) == sum(1 for v in ys if m.isfinite(v)) else ""
                panel_notes.append(f"× {s.label}: exactly 0 at {len(zeros)} point(s){every}, drawn at the floor")
    elif not theory and ys and all(v == 0.0 for v in ys if m.isfinite(v)) and bad < len(ys):
        panel_notes.append(f"{s.label}: exactly 0 at every point")
    if bad and not theory:
        panel_notes.append(f"{s.label}: {bad} NaN/Inf point(s) left out")
    (line,) = ax.plot(xs, drawn, label=f"_theory {s.label}" if theory else s.label, **style)
    return line


def _quiet_corner(ax, lines: int) -> tuple[tuple[float, float], dict[str, str]]:
    """Where in ``ax`` a note box (half the width, ``lines`` lines high) covers the least of the drawn curves:
    a note must not hide the curve it talks about. Six places are tried (upper, middle, lower; left, right),
    each curve sampled densely along its segments."""
    import numpy as np

    to_axes = ax.transData + ax.transAxes.inverted()
    parts = []
    for line in ax.lines:
        xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
        if line.get_label().startswith("_stage end"):
            continue  # drawn in axes coordinates vertically; a thin dotted line may pass under a note
        xy = to_axes.transform(xy)
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) > 1:  # ten points per segment: a steep segment through a box counts, not only its ends
            t = np.linspace(0.0, 1.0, 10, endpoint=False)[:, None, None]
            xy = (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)
        parts.append(xy)
    xy = np.concatenate(parts) if parts else np.empty((0, 2))
    h = min(0.9, 0.07 * lines + 0.04)
    places = []
    for y_anchor, va, (ya, yb) in ((0.99, "top", (1 - h, 1.0)), (0.5 + h / 2, "top", (0.5 - h / 2, 0.5 + h / 2)),
                                   (0.05, "bottom", (0.0, h + 0.04))):
        places.append(((0.01, y_anchor), {"ha": "left", "va": va}, (0.0, 0.5), (ya, yb)))
        places.append(((0.99, y_anchor), {"ha": "right", "va": va}, (0.5, 1.0), (ya, yb)))

    def covered(place) -> int:
        _, _, (xa, xb), (ya, yb) = place
        return int(((xy[:, 0] >= xa) & (xy[:, 0] <= xb) & (xy[:, 1] >= ya) & (xy[:, 1] <= yb)).sum())

    anchor, align, _, _ = min(places, key=covered)
    return anchor, align


def _wrap(note: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(note, width, subsequent_indent="   "))


def _stage_lines(ax, s: Series) -> bool:
    for end in s.stage_positions:
        ax.axvline(end, color=s.color, ls=STAGE_STYLE, lw=0.9, alpha=0.7 if s.user else 0.5, zorder=1,
                   label=f"_stage end {s.label}")
    return bool(s.stage_positions)


def _proxy(plt, linestyle: Any, marker: str = ""):
    from matplotlib.lines import Line2D

    return Line2D([], [], color="0.3", ls=linestyle or "none", marker=marker or None, lw=1.2)


def _xlabel(series: Sequence[Series], x: XAxis) -> str:
    kinds = {"layer" if branches(s.record) else "block" for s in series}
    unit = "block" if kinds == {"block"} else "layer" if kinds == {"layer"} else "block"
    mixed = "; layer for two-branch models" if len(kinds) > 1 else ""
    if x == "relative":
        return f"relative depth ({unit} / last {unit}{mixed})"
    return f"{unit} index (0 = stem{mixed})"


def figure_writer(fig, path: str):
    """A function writing ``fig`` to a given file in the format ``path``'s suffix names (PNG/SVG/PDF), then
    closing it: for ``spp.files.commit_outputs``, which writes a figure and its table as a unit."""
    suffix = str(path).rsplit(".", 1)[-1].lower()

    def write(tmp: str) -> None:
        try:
            fig.savefig(tmp, dpi=120, format=suffix)
        finally:
            _matplotlib().close(fig)

    return write


def close(fig) -> None:
    """Free a figure that will not be saved (a torchrun rank other than 0)."""
    _matplotlib().close(fig)


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to ``path`` atomically (PNG/SVG/PDF by suffix): a temp file beside it, then a rename."""
    from spp.files import atomic_path

    with atomic_path(path) as tmp:
        figure_writer(fig, path)(tmp)


# ---- spp bn ----------------------------------------------------------------------------------------------------


def draw_bn(train_test: Any, sweep: Sequence[Any] = (), *, title: str | None = None):
    """The figure of ``spp bn``: (1) the SPP's variance of the same inputs with mini-batch statistics (train
    mode), population statistics (precise buffers, eval mode) and the EMA buffers (eval mode); (2) per block,
    |log10| of their ratios: where the three disagree is where the train/test inconsistency lives; (3) with a
    batch-size sweep, the mini-batch SPP at each normalisation batch size and the population SPP."""
    plt = _matplotlib()
    panels = 3 if sweep else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), layout="constrained")
    ax1, ax2 = axes[0], axes[1]
    three = (("mini-batch statistics (train mode)", train_test.minibatch, "#d62728", "-"),
             ("population statistics (PreciseBN, eval mode)", train_test.precise, "#1f77b4", "--"),
             ("EMA buffers (eval mode)", train_test.ema, "#2ca02c", ":"))
    values = []
    for label, rec, color, ls in three:
        ys = rec.column("avg_var")
        values += ys
        ax1.plot(rec.column("block"), ys, ls=ls, marker="o", ms=2.5, color=color, label=label, lw=1.6)
    if spans_decades(values):
        ax1.set_yscale("log")
    ax1.set(xlabel="block index (0 = stem)", ylabel="avg_var", title="SPP variance: train / precise / EMA")
    div = train_test.divergence()
    blocks = [r["block"] for r in div]
    for pair, color in (("minibatch/precise", "#9467bd"), ("minibatch/ema", "#8c564b"), ("precise/ema", "#17becf")):
        ax2.plot(blocks, [r[f"avg_var:{pair}"] for r in div], marker="o", ms=2.5, color=color,
                 label=pair.replace("minibatch", "mini-batch"))
    ax2.set(xlabel="block index (0 = stem)", ylabel="|log10 ratio| of avg_var",
            title="Train/test inconsistency per block (0.3 = x2)")
    if sweep:
        ax3 = axes[2]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, res in enumerate(sweep):
            ax3.plot(res.record.column("block"), res.record.column("avg_var"), marker="o", ms=2.5,
                     color=colors[i % len(colors)], label=f"mini-batch, batch {res.batch_size} ({res.samples} samples)")
        population = next((r.population for r in sweep if r.population is not None), None)
        if population is not None:
            ax3.plot(population.column("block"), population.column("avg_var"), "k--", lw=1.2,
                     label="population statistics (eval mode)")
        ax3.set(xlabel="block index (0 = stem)", ylabel="avg_var", title="Normalisation batch size")
        if spans_decades([v for r in sweep for v in r.record.column("avg_var")]):
            ax3.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig

"""Verdicts on a Record: what an SPP means, in words and an exit code.

``check(record)`` reads the statistics spp recorded and returns ``Finding``s: a mean shift, a variance that explodes
or collapses with depth, branches that are zero or dominate their block, NaN/Inf, and (with gradient columns)
gradients that explode or vanish towards the input. A pure function of the Record: it works on a saved record and
inside a training loop, and imports nothing heavy.

How the numbers are read (k is a tap, k-1 the tap before it; index 0 is the stem):

* A tap *continues the stream* when it has the shape of the previous tap (same ``channels`` and ``count``, i.e.
  the same channels and values per channel) and is not a post-norm stream: its shortcut is then the previous tap's
  tensor, unchanged, and ``added_k = avg_var_k - avg_var_{k-1}`` is the variance the block added to the stream.
  Projection blocks (a stage's first) change the stream and are left out of per-block comparisons.
* ``res_avg_var`` is read BEFORE any skip gain, alpha or layer scale, so ``res_avg_var / avg_var_{k-1}`` overstates a
  scaled branch (an NF-ResNet's branch with alpha = 0.2 reads ~1 there but adds 0.04). What a block contributes to
  the stream is ``added_k``; the branch variance itself says how the branch scales with the stream.
* Variance growth: if every block adds at most the variance the stream held at block j (normalised branches, none
  dominating), then ``avg_var_k <= avg_var_j * (1 + (k - j))``: growth is at most linear in depth. That is the
  healthy regime of normalised pre-activation ResNets (BN-ReLU-Conv in train mode) and what NF-ResNets' expected-
  variance bookkeeping assumes. A branch whose variance *tracks* the stream's (``res ~ var^p`` with p near 1, as
  for a BatchNorm in eval mode at init, which is an identity) makes the growth geometric instead.

The thresholds are a ``Thresholds`` dataclass; each default says where it comes from. The JSON form
(``findings_to_json``) and the exit codes (``exit_code``) are the stable interface the CLI prints.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from spp.errors import SppError

Level = Literal["error", "warning", "note"]
KINDS = (
    "nonfinite",
    "mean_shift",
    "variance_growth",
    "variance_collapse",
    "dominant_branch",
    "zero_branch",
    "gradient_growth",
    "gradient_vanishing",
)
LEVELS = ("error", "warning", "note")
JSON_SCHEMA = "spp.check/1"

# Exit codes of `spp check` (2 is the CLI's usage error, SppError.exit_code).
EXIT_HEALTHY = 0
EXIT_FINDINGS = 1
EXIT_NONFINITE = 3


@dataclass(frozen=True)
class Finding:
    """One verdict: what (``kind``), how bad (``level``), where (``blocks``: first and last block index, inclusive),
    the measured ``value`` against its ``threshold``, and a ``message`` that says all of it in one paragraph."""

    kind: str
    level: Level
    blocks: tuple[int, int]
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "level": self.level,
            "blocks": [int(self.blocks[0]), int(self.blocks[1])],
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "message": self.message,
        }


@dataclass(frozen=True)
class Thresholds:
    """Where a verdict changes. Defaults are derived where theory gives one; every field can be overridden
    (``Thresholds(max_growth=100)``, ``Thresholds.from_toml(path)``, ``spp check --max-growth``).

    max_mean_ratio (1.0)
        mu^2 / sigma^2 (from avg_sq_mean / avg_var, without its sampling floor) above which a block has a mean
        shift. At 1 a channel's offset is as large as its
        spread (|mu| = sigma): a ReLU after it is on one side of zero for 84% of the inputs (Phi(1)), so it is
        nearly linear or nearly dead. The same number bounds the per-block *increments*: if each block adds q times
        as much squared mean as variance, the ratio tends to q with depth, so q above it is a mean shift in the
        making (a warning).
    max_growth (None)
        The largest accepted change of the stream's variance, as a factor, between any two blocks (growth, and
        collapse as its inverse). None: the linear bound ``1 + n`` over n blocks, which normalised branches that do
        not dominate cannot exceed (see the module docstring), applied when the growth is geometric (the branch
        variance tracks the stream, ``max_branch_exponent``) or when the shape cannot be told. A number: an absolute
        cap, whatever the shape.
    max_branch_exponent (0.5)
        p in ``res_avg_var ~ avg_var_input ** p``, fitted within runs of blocks that continue the stream. The two
        regimes of theory are p = 0 (normalised branch: linear growth) and p = 1 (the branch scales with its input:
        geometric growth); 0.5 is the midpoint in log space.
    min_shape_growth (2.0)
        The exponent is fitted only when the stream's variance changes at least by this factor within one run:
        below it there is no growth to explain and the fit would read noise.
    max_branch_ratio (1.0)
        added_k / avg_var_{k-1} above which a branch dominates its block: it adds more variance than the whole
        stream held, so the skip path carries less than half of the block's output and the block is not close to
        the identity.
    zero_branch_ratio (2**-18, 3.8e-6)
        A branch whose variance is below this fraction of its input's (before scaling, or as added to the stream) is
        negligible: its std is below bf16's unit roundoff 2**-9 of the stream's std, so adding it in bf16 changes
        nothing. Exactly zero branches (zero-init gains) are the common case: a note, not a failure.
    min_added_variance (0.01)
        The mean-shift increment test needs the stream's variance to grow by at least this fraction of its mean
        over the blocks that continue it; below, the ratio of increments is a ratio of noises.
    max_grad_growth (None)
        The largest accepted change of the gradient's second moment between two blocks of a run (or first to last
        block, when they have the same shape), growth towards the input (explosion) or decay (vanishing). None: the
        linear bound ``1 + n``, by analogy with the forward bound (a residual block's backward is the identity plus
        the branch's Jacobian). That analogy is not a theorem: BatchNorm ResNets in train mode, which train well,
        exceed it at init (x20 over a 6-block stage of a BN-ReLU-Conv ResNet-50, as BatchNorm's gradient explosion
        at init predicts, Yang et al. 2019), so gradient findings are warnings, not errors.
    """

    max_mean_ratio: float = 1.0
    max_growth: float | None = None
    max_branch_exponent: float = 0.5
    min_shape_growth: float = 2.0
    max_branch_ratio: float = 1.0
    zero_branch_ratio: float = 2.0**-18
    min_added_variance: float = 0.01
    max_grad_growth: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SppError(f"threshold {f.name} must be a finite number, not {value!r}")
            if value <= 0:
                raise SppError(f"threshold {f.name} must be positive, not {value!r}")
            if f.name in ("max_growth", "max_grad_growth", "min_shape_growth") and value <= 1:
                raise SppError(f"threshold {f.name} is a factor and must be above 1, not {value!r}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> Thresholds:
        """Thresholds from a TOML file: the field names as top-level keys, or under a ``[thresholds]`` table;
        fields left out keep their defaults. Example::

            max_growth = 50
            max_mean_ratio = 0.5
        """
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise SppError("reading TOML on Python 3.10 needs the tomli package: pip install tomli") from None
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise SppError(f"thresholds file {os.fspath(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SppError(f"thresholds file {os.fspath(path)!r} is not valid TOML: {exc}") from None
        table = data.get("thresholds", data) if isinstance(data.get("thresholds"), dict) else data
        return cls.from_dict(table, source=os.fspath(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "thresholds") -> Thresholds:
        """Thresholds from a mapping of field names to numbers; unknown names are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            from spp.errors import close_matches

            hint = close_matches(unknown[0], known)
            raise SppError(f"{source}: unknown threshold {unknown[0]!r}{hint}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes: Any) -> Thresholds:
        """A copy with ``changes`` applied (None values are left out, so CLI options that were not given keep
        the file's or the default value)."""
        return Thresholds(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})


_OPTIONAL = ("max_growth", "max_grad_growth")


# ---- the checks ---------------------------------------------------------------------------------------------------
def check(record: Any, thresholds: Thresholds | None = None) -> list[Finding]:
    """The verdicts on ``record`` (a ``spp.Record`` or anything with ``.rows``), errors first, then warnings and
    notes; an empty list is a healthy SPP. Rows with NaN/Inf are reported and left out of every other test."""
    t = thresholds or Thresholds()
    rows = [_Row.of(r) for r in getattr(record, "rows", record)]
    findings: list[Finding] = []
    findings += _nonfinite(rows)
    finite = [r for r in rows if r.finite]
    blocks = [r for r in finite if r.block > 0]
    steps = _steps(rows)
    findings += _mean_shift(finite, blocks, steps, t)
    findings += _variance(blocks, steps, t)
    findings += _branches(rows, steps, t)
    findings += _gradients(blocks, steps, t)
    order = {level: i for i, level in enumerate(LEVELS)}
    kinds = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(findings, key=lambda f: (order[f.level], kinds.get(f.kind, len(kinds)), f.blocks))


def is_healthy(findings: Iterable[Finding]) -> bool:
    """No finding at error level (warnings and notes do not make an SPP unhealthy)."""
    return not any(f.level == "error" for f in findings)


def exit_code(findings: Iterable[Finding]) -> int:
    """0 healthy, 1 findings at error level, 3 NaN/Inf anywhere (2 is the CLI's usage error)."""
    findings = list(findings)
    if any(f.kind == "nonfinite" for f in findings):
        return EXIT_NONFINITE
    return EXIT_HEALTHY if is_healthy(findings) else EXIT_FINDINGS


def findings_to_json(findings: Sequence[Finding], thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The stable JSON form of a check.

    ``{"schema": "spp.check/1", "healthy": bool, "exit_code": 0|1|3,
    "counts": {"error": int, "warning": int, "note": int},
    "findings": [{"kind": str, "level": "error"|"warning"|"note", "blocks": [first, last], "value": float|null,
    "threshold": float|null, "message": str}, ...], "thresholds": {name: float|null, ...}}``

    ``kind`` is one of ``KINDS``; ``blocks`` are block indices (0 = stem), inclusive; a non-finite value or
    threshold is written as null (JSON has no NaN/Inf); ``thresholds`` are the ones the check used (null: derived
    from depth, see ``Thresholds``). New keys may be added; existing ones keep their meaning.
    """
    findings = list(findings)
    return {
        "schema": JSON_SCHEMA,
        "healthy": is_healthy(findings),
        "exit_code": exit_code(findings),
        "counts": {level: sum(f.level == level for f in findings) for level in LEVELS},
        "findings": [f.to_dict() for f in findings],
        "thresholds": {k: _json_float(v) for k, v in asdict(thresholds or Thresholds()).items()},
    }


def format_findings(findings: Sequence[Finding]) -> str:
    """Plain text, one paragraph per finding, for a terminal or a log."""
    if not findings:
        return "healthy: no findings"
    return "\n".join(f"{f.level}: {f.kind}: {f.message}" for f in findings)


# ---- rows ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    block: int
    name: str
    sq_mean: float
    var: float
    res: float
    channels: int
    count: int
    nonfinite: int
    branch: str
    post_norm: bool
    grad: float  # the gradient's second moment per channel (variance + squared mean), NaN when not recorded

    @classmethod
    def of(cls, row: dict[str, Any]) -> _Row:
        grad_var = _float(row.get("grad_avg_var"))
        grad_sq = _float(row.get("grad_avg_sq_mean"))
        grad = grad_var + grad_sq if math.isfinite(grad_sq) else grad_var
        return cls(
            block=int(row["block"]),
            name=str(row.get("name", "")),
            sq_mean=_float(row.get("avg_sq_mean")),
            var=_float(row.get("avg_var")),
            res=_float(row.get("res_avg_var")),
            channels=_int(row.get("channels")),
            count=_int(row.get("count")),
            nonfinite=_int(row.get("nonfinite")),
            branch=_str(row.get("branch")) or _branch_from_name(row),
            post_norm=bool(_str(row.get("stream"))),
            grad=grad,
        )

    @property
    def finite(self) -> bool:
        """No NaN/Inf channel, finite output statistics; a NaN branch variance means "no branch" (the stem)."""
        return (self.nonfinite == 0 and math.isfinite(self.sq_mean) and math.isfinite(self.var)
                and not math.isinf(self.res))


@dataclass(frozen=True)
class _Step:
    """Tap ``row`` and the tap before it; ``continues``: the shortcut is the previous tap's tensor, unchanged."""

    row: _Row
    prev: _Row
    continues: bool

    @property
    def added(self) -> float:
        return self.row.var - self.prev.var


def _steps(rows: list[_Row]) -> list[_Step]:
    out = []
    for prev, row in itertools.pairwise(rows):
        if not (row.finite and prev.finite) or row.block <= 0:
            continue
        continues = (
            row.channels == prev.channels
            and row.count == prev.count
            and row.channels > 0
            and not row.post_norm
            and prev.var > 0
        )
        out.append(_Step(row, prev, continues))
    return out


# ---- individual checks --------------------------------------------------------------------------------------------
def _nonfinite(rows: list[_Row]) -> list[Finding]:
    bad = [r for r in rows if not r.finite]
    if not bad:
        return []
    channels = sum(r.nonfinite for r in bad)
    first, last = bad[0].block, bad[-1].block
    what = f"NaN/Inf in {channels} channel statistics" if channels else "NaN/Inf statistics"
    return [
        Finding(
            "nonfinite", "error", (first, last), float(channels), 0.0,
            f"{_span(first, last)}: {what} ({len(bad)} of {len(rows)} taps, first at {bad[0].name or first}; "
            "threshold 0): the signal overflowed or hit an undefined operation, so every statistic from there on is "
            "meaningless; fix the first tap that goes non-finite (its variance usually explodes just before)."
        )
    ]


def _mean_shift(rows: list[_Row], blocks: list[_Row], steps: list[_Step], t: Thresholds) -> list[Finding]:
    """The stem is left out: a max-pool gives its output a large positive channel mean by construction. Blocks
    that still carry the stem's tensor through identity shortcuts (the run that starts at the stem) are flagged only
    where they raise the ratio above the stem's; an inherited mean is a note."""
    stem = rows[0] if rows and rows[0].block == 0 and rows[0].finite and rows[0].var > 0 else None
    stem_run: set[int] = set()
    chain = 0
    for step in steps:  # follow identity shortcuts from the stem
        if step.prev.block != chain or not step.continues:
            break
        stem_run.add(step.row.block)
        chain = step.row.block
    stem_ratio = _mean_ratio(stem) if stem is not None else math.inf
    ratios = [(r, _mean_ratio(r)) for r in blocks if r.var > 0 and r.count != 1]
    inherited = [(r, v) for r, v in ratios
                 if v > t.max_mean_ratio and r.block in stem_run and v <= stem_ratio * (1 + 1e-6)]
    flagged = [(r, v) for r, v in ratios if v > t.max_mean_ratio and (r, v) not in inherited]
    out = []
    if inherited:
        first, last = inherited[0][0].block, inherited[-1][0].block
        worst = max(v for _, v in inherited)
        out.append(
            Finding(
                "mean_shift", "note", (first, last), worst, t.max_mean_ratio,
                f"{_span(first, last)}: squared channel mean up to {worst:.3g}x the variance (threshold "
                f"{t.max_mean_ratio:g}), no more than the stem's {stem_ratio:.3g}x: these blocks carry the stem's "
                "output through identity shortcuts (a max-pool's positive mean is a property of the architecture), "
                "and their branches did not add to it."
            )
        )
    if flagged:
        worst_row, worst = max(flagged, key=lambda rv: rv[1])
        first, last = flagged[0][0].block, flagged[-1][0].block
        out.append(
            Finding(
                "mean_shift", "error", (first, last), worst, t.max_mean_ratio,
                f"{_span(first, last)}{_of(len(flagged), len(ratios))}: squared channel mean up to {worst:.3g}x the "
                f"variance (block {worst_row.block}; threshold {t.max_mean_ratio:g}): channels carry a constant "
                "offset larger than their spread, so the activations after them are mostly on one side of zero "
                "(nearly linear or dead); zero-mean weights (Scaled Weight Standardisation) or a normalisation "
                "layer remove it."
            )
        )
        return out
    cont = [s for s in steps if s.continues]
    added_var = sum(s.added for s in cont)
    mean_var = sum(r.var for r in blocks) / len(blocks) if blocks else 0.0
    if not cont or added_var <= t.min_added_variance * mean_var:
        return out
    added_sq = sum(s.row.sq_mean - s.prev.sq_mean for s in cont)
    q = added_sq / added_var
    if q <= t.max_mean_ratio:
        return out
    first, last = cont[0].row.block, cont[-1].row.block
    out.append(
        Finding(
            "mean_shift", "warning", (first, last), q, t.max_mean_ratio,
            f"{_span(first, last)}: the blocks add {q:.3g}x as much squared mean as variance (threshold "
            f"{t.max_mean_ratio:g}): the ratio is below the threshold now but tends to {q:.3g} with depth, a mean "
            "shift in the making; zero-mean weights (Scaled Weight Standardisation) or centred activations stop it."
        )
    )
    return out


def _mean_ratio(row: _Row) -> float:
    """mu^2 / sigma^2 estimated without the sampling floor: over n values a zero-mean channel's squared sample mean
    is sigma^2 / n on average, so mu^2 = sq_mean - var / (n - 1) and sigma^2 = var n / (n - 1) are unbiased (from
    avg_sq_mean and the population variance avg_var); a 1x1 map at batch 2 would otherwise read ratio ~1 from noise
    alone. Rows without a count keep the plain ratio avg_sq_mean / avg_var."""
    n = row.count
    if n <= 1:
        return row.sq_mean / row.var
    return (row.sq_mean / row.var - 1.0 / (n - 1)) * (n - 1) / n


def branch_exponent(steps: Sequence[_Step], min_growth: float = 2.0) -> float:
    """p in ``res_avg_var ~ avg_var_input ** p``: the least-squares slope of log(res) on log(input variance),
    within runs of blocks that continue the stream (and within each branch name, so attention and MLP branches
    of different sizes are not compared). NaN when no run's input variance changes by ``min_growth``."""
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    run = 0
    for s in steps:
        if not s.continues:
            run += 1
            continue
        if s.row.res > 0 and s.prev.var > 0:
            groups.setdefault((run, s.row.branch), []).append((math.log(s.prev.var), math.log(s.row.res)))
    sxx = sxy = 0.0
    spread = 0.0
    for points in groups.values():
        if len(points) < 2:
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxx += sum((x - mx) ** 2 for x, _ in points)
        sxy += sum((x - mx) * (y - my) for x, y in points)
        spread = max(spread, max(x for x, _ in points) - min(x for x, _ in points))
    if spread < math.log(min_growth) or sxx <= 0:
        return math.nan
    return sxy / sxx


def _extreme_ratio(
    values: list[tuple[int, float]], *, rising: bool, cap: float | None, pairs: Any = None
) -> tuple[float, int, int]:
    """Over pairs of taps i < j (positions in ``values``; only those ``pairs(i, j)`` allows): the largest change
    factor ``v_j / v_i`` (``rising``) or ``v_i / v_j``, relative to its bound (``cap``, or the linear bound
    ``1 + (j - i)``). Returns (factor / bound, block of i, block of j); (0, -1, -1) when no pair qualifies."""
    best = (0.0, -1, -1)
    for i in range(len(values)):
        bi, vi = values[i]
        for j in range(i + 1, len(values)):
            if pairs is not None and not pairs(i, j):
                continue
            bj, vj = values[j]
            factor = vj / vi if rising else vi / vj
            bound = cap if cap is not None else 1.0 + (j - i)
            if factor / bound > best[0]:
                best = (factor / bound, bi, bj)
    return best


def _runs(blocks: list[_Row], steps: list[_Step]) -> dict[int, int]:
    """Block -> run number: a run is a maximal sequence of blocks whose steps continue the stream."""
    continues = {s.row.block: s.continues for s in steps}
    runs, run = {}, 0
    for r in blocks:
        if not continues.get(r.block, False):
            run += 1
        runs[r.block] = run
    return runs


def _variance(blocks: list[_Row], steps: list[_Step], t: Thresholds) -> list[Finding]:
    """Growth and collapse between two blocks of one run of identity shortcuts (where theory bounds the change),
    and from the first block to the last (the total over the network). A projection sets a new level by its own
    design (a projection of a normalised input restarts a BN-ReLU-Conv stage near 1, ConvNeXt's downsampling conv
    starts lower), so pairs across projections are not compared otherwise."""
    values = [(r.block, r.var) for r in blocks if r.var > 0]
    if len(values) < 2:
        return []
    runs = _runs(blocks, steps)
    run_of = [runs.get(b, -1) for b, _ in values]
    last = len(values) - 1

    def pairs(i: int, j: int) -> bool:
        return run_of[i] == run_of[j] or (i == 0 and j == last)

    index = {b: i for i, (b, _) in enumerate(values)}
    p = branch_exponent(steps, t.min_shape_growth)
    tracks = math.isfinite(p) and p >= t.max_branch_exponent
    shape = (
        f"the branch variance tracks the stream's (exponent {p:.2f}), so the growth is geometric" if tracks
        else f"the branch variance does not track the stream's (exponent {p:.2f})" if math.isfinite(p)
        else "too few blocks continue the stream to tell the growth's shape"
    )
    out = []
    excess, b0, b1 = _extreme_ratio(values, rising=True, cap=t.max_growth, pairs=pairs)
    if excess > 1 and (t.max_growth is not None or not math.isfinite(p) or tracks):
        n = index[b1] - index[b0]
        factor = _ratio(values, b0, b1)
        bound = t.max_growth if t.max_growth is not None else 1.0 + n
        out.append(
            Finding(
                "variance_growth", "error", (b0, b1), factor, bound,
                f"{_span(b0, b1)}: the variance grows x{factor:.4g} over {n} blocks, beyond x{bound:.4g} "
                f"({_bound_words(t.max_growth, 'max_growth', n)}); {shape}: the branches are not normalised "
                "(an initialised BatchNorm in eval mode is an identity) and the signal explodes with depth; "
                "normalise each branch's input (BatchNorm in train mode, an NF-ResNet's 1/beta) or scale the "
                "branches down (alpha, 1/sqrt(depth), zero-init gains)."
            )
        )
    elif tracks and t.max_growth is None:
        growth, g1 = max(((v1 / v0, c1) for (_, v0), (c1, v1) in itertools.pairwise(values)), default=(1.0, 0))
        out.append(
            Finding(
                "variance_growth", "note", (values[0][0], values[-1][0]), p, t.max_branch_exponent,
                f"{_span(values[0][0], values[-1][0])}: the branch variance tracks the stream's (exponent "
                f"{p:.2f}, threshold {t.max_branch_exponent:g}), so each block multiplies the variance (by up to "
                f"x{growth:.3g}, block {g1}); within the linear bound at this depth, but if the branches keep tracking "
                "the stream, deeper versions of this network grow geometrically."
            )
        )
    excess, b0, b1 = _extreme_ratio(values, rising=False, cap=t.max_growth, pairs=pairs)
    if excess > 1:
        n = index[b1] - index[b0]
        factor = 1.0 / _ratio(values, b0, b1)
        bound = t.max_growth if t.max_growth is not None else 1.0 + n
        out.append(
            Finding(
                "variance_collapse", "error", (b0, b1), factor, bound,
                f"{_span(b0, b1)}: the variance falls x{factor:.4g} over {n} blocks, beyond x{bound:.4g} "
                f"({_bound_words(t.max_growth, 'max_growth', n)}); identity shortcuts cannot lose variance and "
                "variance-preserving projections keep it, so a shortcut scales the stream down or branches cancel "
                "it: the signal vanishes with depth; check the shortcut path (downscaled skips, an averaging "
                "projection such as avg-pool downsampling of uncorrelated features, a norm placed on the stream)."
            )
        )
    return out


def _branches(rows: list[_Row], steps: list[_Step], t: Thresholds) -> list[Finding]:
    out = []
    dominant = [(s, s.added / s.prev.var) for s in steps if s.continues]
    considered = len(dominant)
    dominant = [(s, r) for s, r in dominant if r > t.max_branch_ratio]
    if dominant:
        worst_step, worst = max(dominant, key=lambda sr: sr[1])
        first, last = dominant[0][0].row.block, dominant[-1][0].row.block
        out.append(
            Finding(
                "dominant_branch", "warning", (first, last), worst, t.max_branch_ratio,
                f"{_span(first, last)}{_of(len(dominant), considered)}: a block adds up to {worst:.3g}x the "
                f"variance of its input (block {worst_step.row.block}; threshold {t.max_branch_ratio:g}): the branch "
                "outweighs the skip path, so the block is far from the identity that makes deep residual networks "
                "trainable; scale the branch down (alpha, a zero-init gain, LayerScale) or normalise its input."
            )
        )
    zero: list[tuple[_Row, float]] = []
    live = 0
    by_block = {s.row.block: s for s in steps}
    for row in rows:
        step = by_block.get(row.block)
        if row.block <= 0 or step is None or math.isnan(row.res):
            continue
        live += 1
        ratios = [row.res / step.prev.var]
        if step.continues:
            ratios.append(abs(step.added) / step.prev.var)
        ratio = min(ratios)
        if ratio < t.zero_branch_ratio:
            zero.append((row, ratio))
    if zero:
        first, last = zero[0][0].block, zero[-1][0].block
        exact = sum(r.res == 0.0 for r, _ in zero)
        largest = max(v for _, v in zero)
        size = ("are exactly zero" if exact == len(zero) else
                f"are negligible, at most {largest:.3g} of their input's variance ({exact} exactly zero)")
        out.append(
            Finding(
                "zero_branch", "note", (first, last), largest, t.zero_branch_ratio,
                f"{_span(first, last)}{_of(len(zero), live)}: residual branches {size} (threshold "
                f"{t.zero_branch_ratio:.3g} of the input's variance, before or after their scale): "
                "zero-init gains (SkipInit, a zero-init last BatchNorm or LayerScale) make each block an identity "
                "at init, so a flat SPP is the truth here, not a failure; record with the gains set to 1 to see "
                "what the branches would do."
            )
        )
    return out


def _gradients(blocks: list[_Row], steps: list[_Step], t: Thresholds) -> list[Finding]:
    """Pairs within one run of identity shortcuts, and first to last block when both have the same shape: the
    gradient per element is not comparable across a projection that changes the resolution (a stride-2 projection
    sends each gradient to one position in four)."""
    values = [(r.block, r.grad) for r in blocks if math.isfinite(r.grad) and r.grad > 0]
    if len(values) < 2:
        return []
    runs = _runs(blocks, steps)
    run_of = [runs.get(b, -1) for b, _ in values]
    shape = {r.block: (r.channels, r.count) for r in blocks}
    last = len(values) - 1
    same_ends = shape[values[0][0]] == shape[values[-1][0]]

    def pairs(i: int, j: int) -> bool:
        return run_of[i] == run_of[j] or (i == 0 and j == last and same_ends)

    index = {b: i for i, (b, _) in enumerate(values)}
    out = []
    # Backwards, from the output towards the input: a gradient larger at an earlier block is growth.
    for rising, kind, verb, meaning in (
        (False, "gradient_growth", "grows",
         "the early blocks get far larger gradients than the late ones, so one learning rate cannot suit both "
         "(exploding gradients); normalised or downscaled branches (alpha, zero-init gains) and fewer blocks per "
         "stage reduce it"),
        (True, "gradient_vanishing", "shrinks",
         "the early blocks barely learn (vanishing gradients); identity shortcuts that carry the gradient "
         "unchanged (pre-norm rather than post-norm blocks, no downscaled skips) keep it"),
    ):
        excess, b0, b1 = _extreme_ratio(values, rising=rising, cap=t.max_grad_growth, pairs=pairs)
        if excess <= 1:
            continue
        n = index[b1] - index[b0]
        factor = _ratio(values, b0, b1) if rising else 1.0 / _ratio(values, b0, b1)
        bound = t.max_grad_growth if t.max_grad_growth is not None else 1.0 + n
        out.append(
            Finding(
                kind, "warning", (b0, b1), factor, bound,
                f"{_span(b0, b1)}: the gradient's second moment {verb} x{factor:.4g} from block {b1} back to block "
                f"{b0} ({n} blocks), beyond x{bound:.4g} ({_bound_words(t.max_grad_growth, 'max_grad_growth', n)}): "
                f"{meaning}."
            )
        )
    return out


# ---- helpers ------------------------------------------------------------------------------------------------------
def _ratio(values: list[tuple[int, float]], b0: int, b1: int) -> float:
    v = dict(values)
    return v[b1] / v[b0]


def _bound_words(cap: float | None, name: str, n: int) -> str:
    return f"{name}" if cap is not None else f"the linear bound 1 + {n} for normalised branches"


def _span(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def _of(count: int, total: int) -> str:
    return f" ({count} of {total} blocks)" if total else ""


def _branch_from_name(row: dict[str, Any]) -> str:
    """Records without a ``branch`` column: a tap named ``<module>.attn`` is the block's ``attn`` branch."""
    name, module = _str(row.get("name")), _str(row.get("module"))
    return name[len(module) + 1:] if module and name.startswith(module + ".") else ""


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _json_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

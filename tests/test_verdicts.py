"""`spp.check`: verdicts on Records.

The reference ResNets give the verdicts theory expects; every kind of finding fires on a constructed Record whose
numbers are derived in the test, and stays silent just below its threshold.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import spp.hooks
from spp.errors import SppError
from spp.models import create_model
from spp.records import Record
from spp.schema import NAMES as COLUMNS
from spp.verdicts import (
    EXIT_FINDINGS,
    EXIT_HEALTHY,
    EXIT_NONFINITE,
    KINDS,
    Thresholds,
    _Row,
    _steps,
    branch_exponent,
    check,
    exit_code,
    findings_to_json,
    is_healthy,
)

NAN = math.nan


# ---- constructed records ------------------------------------------------------------------------------------------
def _row(block: int, var: float, res: float = NAN, *, sq: float = 0.0, channels: int = 64, count: int = 1024,
         nonfinite: int = 0, **extra) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(block=block, name=f"b{block}" if block else "stem", stage=0 if block == 0 else 1, avg_sq_mean=sq,
               avg_var=var, res_avg_var=res, expected_var=NAN, channels=channels, count=count,
               nonfinite=nonfinite, module=f"b{block}" if block else "b1")
    row.update(extra)
    return row


def _record(rows: list[dict]) -> Record:
    return Record(rows=rows, stage_ends=[rows[-1]["block"]])


def _stream(variances: list[float], branches: list[float], *, sq: list[float] | None = None, **extra) -> Record:
    """A stem (16 channels), a projecting block 1 (64 channels) and continuing blocks 2..: ``variances[k]`` is the
    output variance of block k+1, ``branches[k]`` its branch variance."""
    rows = [_row(0, 1.0, channels=16)]
    for k, (var, res) in enumerate(zip(variances, branches, strict=True)):
        rows.append(_row(k + 1, var, res, sq=(sq[k] if sq else 0.0), **extra))
    return _record(rows)


def _kinds(findings, level=None) -> set[str]:
    return {f.kind for f in findings if level is None or f.level == level}


def _one(findings, kind: str, level: str):
    found = [f for f in findings if f.kind == kind and f.level == level]
    assert len(found) == 1, findings
    return found[0]


# ---- mean shift -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("variance", "flagged"), [(0.98, True), (1.02, False)])
def test_mean_shift_fires_when_the_squared_mean_exceeds_the_variance(variance, flagged):
    """A channel mu + sigma z over n = 1025 values reads squared mean mu^2 + sigma^2 / n and variance
    sigma^2 (n - 1) / n on average; with mu^2 = 1 the unbiased ratio mu^2 / sigma^2 = 1 / sigma^2 is flagged iff
    sigma^2 < 1."""
    n = 1025
    sq, var = 1.0 + variance / n, variance * (n - 1) / n
    rec = _stream([var, var], [0.5, 0.0], sq=[sq, sq], count=n)
    findings = check(rec)
    if flagged:
        f = _one(findings, "mean_shift", "error")
        assert f.value == pytest.approx(1 / variance, rel=1e-12) and f.threshold == 1.0 and f.blocks == (1, 2)
        assert exit_code(findings) == EXIT_FINDINGS
    else:
        assert "mean_shift" not in _kinds(findings)


@pytest.mark.parametrize(("q", "flagged"), [(1.1, True), (0.9, False)])
def test_mean_shift_warns_when_blocks_add_more_mean_than_variance(q, flagged):
    """Each block adds b = 0.5 to the variance and q b to the squared mean: the ratio (0.1 + q b k) / (1 + b k)
    tends to q, which exceeds 1 iff q > 1; over 5 blocks it stays below 1 (at most (0.1 + 2.2) / 3 = 0.77)."""
    b = 0.5
    variances = [1 + b * k for k in range(5)]
    sq = [0.1 + q * b * k for k in range(5)]
    findings = check(_stream(variances, [b] * 5, sq=sq, count=0))  # no count: no sampling floor
    assert not any(f.kind == "mean_shift" and f.level == "error" for f in findings)
    if flagged:
        f = _one(findings, "mean_shift", "warning")
        assert f.value == pytest.approx(q, rel=1e-12) and f.blocks == (2, 5)
        assert is_healthy(findings)
    else:
        assert "mean_shift" not in _kinds(findings)


def test_a_mean_carried_from_the_stem_is_a_note():
    """Zero branches and identity shortcuts carry the stem's tensor unchanged: its ratio 5 is inherited, not made
    by the blocks, so it is a note; the first block that raises the ratio above the stem's is an error."""
    rows = [_row(0, 1.0, sq=5.0, count=0), _row(1, 1.0, 0.0, sq=5.0, count=0), _row(2, 1.0, 0.0, sq=5.0, count=0)]
    findings = check(_record(rows))
    note = _one(findings, "mean_shift", "note")
    assert note.blocks == (1, 2) and note.value == 5.0 and exit_code(findings) == EXIT_HEALTHY
    rows.append(_row(3, 1.0, 0.5, sq=6.0, count=0))
    error = _one(check(_record(rows)), "mean_shift", "error")
    assert error.blocks == (3, 3) and error.value == 6.0


def test_the_mean_ratio_discounts_its_sampling_floor():
    """Two values per channel (batch 2 on a 1x1 map) of a zero-mean channel: squared mean sigma^2 / 2 and
    population variance sigma^2 / 2 on average, ratio 1 from noise alone. Unbiased, mu^2 = sq - var / (n - 1) and
    sigma^2 = var n / (n - 1): the ratio is (read - 1 / (n - 1)) (n - 1) / n, 0 here. With n = 3 it is
    (read - 1/2) 2/3: a read ratio of 1.9 is 0.93 (not flagged), 2.1 is 1.07 (flagged)."""
    rows = [_row(0, 1.0, count=2), _row(1, 0.5, 0.5, sq=0.5, count=2)]
    assert not check(_record(rows))
    for read, flagged in ((1.9, False), (2.1, True)):
        rows = [_row(0, 1.0, count=3), _row(1, 1.0, 0.5, sq=read, count=3)]
        assert ("mean_shift" in _kinds(check(_record(rows)), "error")) is flagged


# ---- variance -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("c", "flagged"), [(0.28, True), (0.26, False)])
def test_geometric_growth_beyond_the_linear_bound_is_an_error(c, flagged):
    """Branches that scale with the stream (res_k = c var_{k-1}, exponent 1) multiply the variance by 1 + c per
    block: over the 10 continuing blocks 1..11 it grows (1 + c)^10 against the linear bound 1 + 10 = 11, exceeded
    iff c > 11^(1/10) - 1 = 0.2709."""
    variances = [(1 + c) ** k for k in range(11)]
    branches = [1.0] + [c * v for v in variances[:-1]]
    rec = _stream(variances, branches)
    assert branch_exponent(_steps([_Row.of(r) for r in rec.rows])) == pytest.approx(1.0, abs=1e-9)
    findings = check(rec)
    if flagged:
        f = _one(findings, "variance_growth", "error")
        assert f.value == pytest.approx((1 + c) ** 10, rel=1e-12) and f.threshold == 11 and f.blocks == (1, 11)
        assert exit_code(findings) == EXIT_FINDINGS
    else:
        note = _one(findings, "variance_growth", "note")  # geometric, but within the bound at this depth
        assert note.value == pytest.approx(1.0, abs=1e-9) and note.threshold == 0.5
        assert is_healthy(findings)


def test_linear_growth_passes_and_a_dominant_first_branch_warns():
    """Normalised branches add a constant b = 1.05 (exponent 0): the variance grows linearly, 1 + 1.05 k. Block 2
    adds 1.05 times its input (dominant); block 3 adds 1.05 / 2.05 < 1. Linear growth is not an error, even though
    the pair (1, 2) grows x2.05 > 1 + 1."""
    b = 1.05
    variances = [1 + b * k for k in range(8)]
    findings = check(_stream(variances, [1.0] + [b] * 7))
    assert "variance_growth" not in _kinds(findings)
    f = _one(findings, "dominant_branch", "warning")
    assert f.blocks == (2, 2) and f.value == pytest.approx(b, rel=1e-12) and f.threshold == 1.0
    assert is_healthy(findings)


def test_growth_of_unknown_shape_beyond_the_bound_is_an_error():
    """One continuing block cannot show the shape (the exponent needs a run whose input variance doubles), so
    x2.1 > 1 + 1 in one block is an error."""
    findings = check(_stream([1.0, 2.1], [1.0, 1.1]))
    f = _one(findings, "variance_growth", "error")
    assert f.value == pytest.approx(2.1) and f.threshold == 2 and "too few blocks" in f.message


def test_max_growth_is_an_absolute_cap_whatever_the_shape():
    """Linear growth 1 + 6 k over 10 blocks reaches 61: within the derived bound's spirit (exponent 0) but above
    an explicit cap of 50; 1 + k (reaching 11) is not."""
    t = Thresholds(max_growth=50)
    f = _one(check(_stream([1 + 6 * k for k in range(11)], [1.0] + [6.0] * 10), t), "variance_growth", "error")
    assert f.value == pytest.approx(61.0) and f.threshold == 50 and f.blocks == (1, 11)
    assert "variance_growth" not in _kinds(check(_stream([1 + k for k in range(11)], [1.0] * 11), t))


@pytest.mark.parametrize(("factor", "flagged"), [(0.6, True), (0.65, False)])
def test_collapse_within_a_run_is_an_error(factor, flagged):
    """An identity-shortcut run whose variance is multiplied by f per block: over n blocks it falls 1/f^n, against
    the bound 1 + n. f = 0.6: n = 3 gives 4.63 > 4; f = 0.65: 1.54 < 2, 2.37 < 3, 3.64 < 4."""
    findings = check(_stream([factor**k for k in range(4)], [0.01] * 4))
    if flagged:
        f = _one(findings, "variance_collapse", "error")
        assert f.value == pytest.approx(factor**-3, rel=1e-12) and f.threshold == 4 and f.blocks == (1, 4)
    else:
        assert "variance_collapse" not in _kinds(findings)


def test_a_projection_may_restart_the_stream_but_the_total_may_not_collapse():
    """BN-ReLU-Conv stages: +0.7 per block, then a projection (new channel count) restarts near 1.3: not a
    collapse. Zero branches across projections that each divide the variance by 4 (avg-pool downsampling of
    uncorrelated features): 3 -> 0.047 over 3 blocks is x64 > 1 + 3 from the first block to the last."""
    rows = [_row(0, 1.0, channels=16), *[_row(k, 1.0 + 0.7 * (k - 1), 0.7) for k in range(1, 5)],
            *[_row(k, 1.3 + 0.7 * (k - 5), 0.7, channels=128, count=256) for k in range(5, 9)]]
    assert not _kinds(check(_record(rows)), "error")
    rows = [_row(0, 1.0, channels=16)] + [_row(k, 3.0 / 4 ** (k - 1), 0.0, channels=64 * 2**k, count=4096 // 4**k)
                                          for k in range(1, 5)]
    f = _one(check(_record(rows)), "variance_collapse", "error")
    assert f.value == pytest.approx(64.0) and f.threshold == 4 and f.blocks == (1, 4)


# ---- branches --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "flagged"), [(1.01, True), (0.99, False)])
def test_dominant_branch(r, flagged):
    """Block 2 adds r times its input's variance 2 (its branch adds 2r, as every later block: exponent 0, linear
    growth); later blocks add 2r to a larger stream, so only block 2 can dominate."""
    variances = [2.0 + 2 * r * k for k in range(6)]
    findings = check(_stream(variances, [1.0] + [2 * r] * 5))
    if flagged:
        f = _one(findings, "dominant_branch", "warning")
        assert f.blocks == (2, 2) and f.value == pytest.approx(r, rel=1e-12)
    else:
        assert "dominant_branch" not in _kinds(findings)
    assert is_healthy(findings)


@pytest.mark.parametrize(("scale", "noted"), [(0.0, True), (0.9, True), (1.1, False)])
def test_zero_branch_is_a_note(scale, noted):
    """Branches of variance scale * 2^-18 of their input's, adding exactly that to the stream: negligible (std
    below bf16's unit roundoff of the stream's) iff scale < 1."""
    eps = 2.0**-18
    variances = [1.0 + scale * eps * k for k in range(4)]
    findings = check(_stream(variances, [1.0] + [scale * eps * v for v in variances[:-1]]))
    if noted:
        f = _one(findings, "zero_branch", "note")
        assert f.blocks == (2, 4) and f.value == pytest.approx(scale * eps, rel=1e-6) and f.threshold == eps
        assert exit_code(findings) == EXIT_HEALTHY
    else:
        assert "zero_branch" not in _kinds(findings)


def test_a_scaled_branch_is_judged_by_what_it_adds():
    """An NF-ResNet branch read before alpha = 0.2 has variance ~1 against an input of 1.04 (ratio 0.96), but adds
    alpha^2 = 0.04: not dominant. A LayerScale of 1e-6 makes a unit branch add 1e-12: negligible."""
    findings = check(_stream([1 + 0.04 * k for k in range(6)], [1.0] * 6))
    assert not findings
    f = _one(check(_stream([1 + 1e-12 * k for k in range(4)], [1.0] * 4)), "zero_branch", "note")
    assert f.value == pytest.approx(1e-12, rel=1e-3)


# ---- NaN / Inf ------------------------------------------------------------------------------------------------------
def test_nonfinite_is_an_error_with_exit_code_3():
    """Channels counted non-finite, or an infinite variance, make every later statistic meaningless."""
    rows = [_row(0, 1.0), _row(1, 1.5, 0.5), _row(2, math.inf, 0.5, nonfinite=3), _row(3, NAN, NAN, nonfinite=64)]
    findings = check(_record(rows))
    f = _one(findings, "nonfinite", "error")
    assert f.blocks == (2, 3) and f.value == 67 and exit_code(findings) == EXIT_NONFINITE
    assert not is_healthy(findings)


def test_exit_codes():
    assert exit_code([]) == EXIT_HEALTHY == 0 and EXIT_FINDINGS == 1 and EXIT_NONFINITE == 3
    assert SppError("x").exit_code == 2  # the CLI's usage error stays distinct


# ---- gradients ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("grads", "kind", "value"), [
    ([16, 8, 4, 2, 1], "gradient_growth", 16.0),  # x2 per block back to the input: 16 over 4 blocks > 1 + 4
    ([1, 2, 4, 8, 16], "gradient_vanishing", 16.0),
    ([5, 4, 3, 2, 1], None, None),  # linear: e_i / e_j = (6 - i) / (6 - j) <= 1 + (j - i), equality at (1, 5)
])
def test_gradient_findings(grads, kind, value):
    """Gradient second moments (variance + squared mean) at blocks 1..5 of one run."""
    half = [g / 2 for g in grads]
    rec = _stream([1.0 + 0.5 * k for k in range(5)], [1.0] + [0.5] * 4)
    for row, g in zip(rec.rows[1:], half, strict=True):
        row.update(grad_avg_var=g, grad_avg_sq_mean=g, grad_res_avg_var=NAN)
    findings = check(rec)
    if kind is None:
        assert not findings
    else:
        f = _one(findings, kind, "warning")
        assert f.value == pytest.approx(value) and f.threshold == 5 and f.blocks == (1, 5)
    rec_without = _stream([1.0 + 0.5 * k for k in range(5)], [1.0] + [0.5] * 4, grad_avg_var=NAN)
    assert not check(rec_without)


# ---- thresholds: TOML and validation --------------------------------------------------------------------------------
GEOMETRIC = [1.3**k for k in range(11)]  # x13.8 over 10 blocks, exponent 1: an error at the default bound 11


def _geometric() -> Record:
    return _stream(GEOMETRIC, [1.0] + [0.3 * v for v in GEOMETRIC[:-1]])


def test_thresholds_from_toml(tmp_path):
    assert "variance_growth" in _kinds(check(_geometric()), "error")
    path = tmp_path / "spp.toml"
    path.write_text("[thresholds]\nmax_growth = 20\nmax_mean_ratio = 0.5\n")
    t = Thresholds.from_toml(path)
    assert t.max_growth == 20 and t.max_mean_ratio == 0.5 and t.max_branch_ratio == Thresholds().max_branch_ratio
    assert "variance_growth" not in _kinds(check(_geometric(), t), "error")  # 13.8 < 20
    path.write_text("max_growth = 10.0\n")  # top-level keys work too
    assert Thresholds.from_toml(path).max_growth == 10.0
    assert t.replace(max_growth=None, max_mean_ratio=2.0) == Thresholds(max_growth=20, max_mean_ratio=2.0)


@pytest.mark.parametrize(("text", "words"), [
    ("max_grwoth = 3\n", "unknown threshold 'max_grwoth' (did you mean: max_growth"),
    ("max_growth = 0.5\n", "must be above 1"),
    ("max_mean_ratio = 0\n", "must be positive"),
    ("max_mean_ratio = 'big'\n", "must be a finite number"),
    ("max_growth = [\n", "not valid TOML"),
])
def test_bad_thresholds_files_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(SppError) as err:
        Thresholds.from_toml(path)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SppError, match="does not exist"):
        Thresholds.from_toml(tmp_path / "missing.toml")


# ---- JSON -----------------------------------------------------------------------------------------------------------
def test_json_schema():
    findings = check(_record([_row(0, 1.0), _row(1, 1.0, 0.0, sq=0.0), _row(2, 2.1, 1.1), _row(3, math.inf,
                                                                                           nonfinite=1)]))
    doc = findings_to_json(findings, Thresholds(max_growth=1.5))
    text = json.dumps(doc, allow_nan=False)  # strict JSON: no NaN/Inf anywhere
    back = json.loads(text)
    assert set(back) == {"schema", "healthy", "exit_code", "counts", "findings", "thresholds"}
    assert back["schema"] == "spp.check/1" and back["healthy"] is False and back["exit_code"] == 3
    assert back["counts"] == {lvl: sum(f.level == lvl for f in findings) for lvl in ("error", "warning", "note")}
    assert back["thresholds"]["max_growth"] == 1.5 and back["thresholds"]["max_grad_growth"] is None
    for item, f in zip(back["findings"], findings, strict=True):
        assert set(item) == {"kind", "level", "blocks", "value", "threshold", "message"}
        assert item["kind"] in KINDS and item["level"] in ("error", "warning", "note")
        assert item["blocks"] == list(f.blocks) and all(isinstance(b, int) for b in item["blocks"])
        assert isinstance(item["message"], str) and item["message"]
    levels = [item["level"] for item in back["findings"]]
    assert levels == sorted(levels, key=["error", "warning", "note"].index)  # errors first
    assert findings_to_json([]) | {"thresholds": None} == {
        "schema": "spp.check/1", "healthy": True, "exit_code": 0, "counts": {"error": 0, "warning": 0, "note": 0},
        "findings": [], "thresholds": None}


# ---- the paper's reference networks ---------------------------------------------------------------------------------
@functools.cache
def _reference(name: str, mode: str = "train", ws: bool = True) -> Record:
    torch.manual_seed(0)
    model = create_model(name, width=0.125, **({} if ws else {"ws": False}))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return spp.hooks.record(model, x, mode=mode)


@pytest.mark.parametrize(("name", "mode", "ws", "errors"), [
    ("nf_resnet50", "train", True, set()),
    ("nf_resnet50", "train", False, {"mean_shift"}),
    ("bn_relu_resnet50", "eval", True, {"mean_shift", "variance_growth"}),
    ("bn_relu_resnet50", "train", True, set()),
])
def test_reference_verdicts(name, mode, ws, errors):
    """NF-ResNet with Scaled WS: variance 1 + k alpha^2, no mean: healthy. Without WS the ReLU's positive mean
    passes through He-init weights: mean shift. BN in eval at init is an identity: the branch scales with the
    stream, geometric growth (and the stem's mean passes). BN in train mode: linear growth, healthy."""
    findings = check(_reference(name, mode, ws))
    assert _kinds(findings, "error") == errors
    assert exit_code(findings) == (EXIT_HEALTHY if not errors else EXIT_FINDINGS)


def test_bn_relu_conv_in_train_mode_grows_linearly_as_theory_says():
    """Why it passes: each BN-ReLU-Conv branch adds Var = 2 Var(relu(z)) = 1 - 1/pi = 0.682 whatever the stream's
    variance (exponent ~0), so a stage grows linearly; in eval mode the branch scales with the stream (exponent ~1)."""
    rec = _reference("bn_relu_resnet50", "train", True)
    steps = [s for s in _steps([_Row.of(r) for r in rec.rows]) if s.continues]
    added = sum(s.added for s in steps) / len(steps)
    assert added == pytest.approx(1 - 1 / math.pi, rel=0.1)
    assert abs(branch_exponent(_steps([_Row.of(r) for r in rec.rows]))) < 0.25
    rec = _reference("bn_relu_resnet50", "eval", True)
    assert branch_exponent(_steps([_Row.of(r) for r in rec.rows])) > 0.75


def test_timm_resnet_zero_init_branches_are_notes():
    """timm's ResNets zero-initialise each block's last BN (zero_init_last): every branch is exactly zero, a note.
    ResNet-26's 8 bottlenecks at 32 px end on a 1x1 map at batch 2, where the mean ratio is noise (its floor 1)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet26", pretrained=False)
    findings = check(spp.hooks.record(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))))
    f = _one(findings, "zero_branch", "note")
    assert f.blocks == (1, 8) and f.value == 0.0 and "8 of 8" in f.message
    assert exit_code(findings) == EXIT_HEALTHY

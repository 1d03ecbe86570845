"""The zoo check: spp's discovery and recorder against the independent oracle (tests/oracle.py), one model at a time.

Per model (tests/zoo_models.py): give constant-initialised parameters (zero-init gains, 1e-5 layer scales) random
values in [0.5, 1.5] so that a branch read after its scale cannot hide behind a scale of 0 or 1, then
1. the oracle's forward records every residual addition with its operands, the sum, the branch before any scale
   and the sum after the unary ops that follow it (a post-activation block's output), and proves channel axes
   from the aten ops that produced each tensor;
2. ``spp.discovery.find_taps(model)`` and ``spp.hooks.record(model, x, mode="eval", taps=taps)``;
3. a third forward captures, with these hooks, the tensor at every site a tap names.
Each tap spp did not refuse is matched to the addition whose sum (or post-activation sum) its stream tensor is,
up to a permutation of elements; its branch is compared with the addition's branch before its scale; its numbers
with a float64 computation on the oracle's channel axis (1e-4 relative: spp sums float32 moments). A tap spp
refused prints nothing, so it can be wrong about nothing; it only counts as an addition not read.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from tests.oracle import AddEvent, channel_stats, trace

REL_TOL = 1e-4  # spp sums float32 moments by design (documented: up to 1.2e-5 per channel)
model_ref: list = [None]  # spp sums float32 moments by design (documented: up to 1.2e-5 per channel)


# ---- helpers -----------------------------------------------------------------------------------------------


@torch.no_grad()
def liven(model: nn.Module, seed: int = 0) -> None:
    """Constant-initialised parameters (gains 0 or 1, layer scales 1e-5) become random in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() and p.is_floating_point() and bool((p == p.reshape(-1)[0]).all()):
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((first_tensor(v) for v in value if first_tensor(v) is not None), None)
    if isinstance(value, dict):
        return next((first_tensor(v) for v in value.values() if first_tensor(v) is not None), None)
    return None


def input_arg(module: nn.Module, arg, args: tuple, kwargs: dict):
    """The input a Site names: a position (found by parameter name when passed as a keyword) or a name."""
    try:
        names = [p for p in inspect.signature(module.forward).parameters]
    except (TypeError, ValueError):
        names = []
    if isinstance(arg, int):
        if arg < len(args):
            return args[arg]
        return kwargs.get(names[arg]) if arg < len(names) else None
    if arg in kwargs:
        return kwargs[arg]
    return args[names.index(arg)] if arg in names and names.index(arg) < len(args) else None


@torch.no_grad()
def capture_sites(model: nn.Module, sites, x) -> dict:
    """One forward; a clone of the tensor at every site (first call of its module)."""
    modules = dict(model.named_modules())
    values: dict = {}
    handles = []
    for site in set(sites):
        mod = modules.get(site.module)
        if mod is None:
            continue
        if site.kind == "input":

            def pre(m, args, kwargs, site=site):
                v = first_tensor(input_arg(m, site.arg, args, kwargs))
                if v is not None:
                    values.setdefault(site, v.detach().clone())

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(m, args, out, site=site):
                v = first_tensor(out)
                if v is not None:
                    values.setdefault(site, v.detach().clone())

            handles.append(mod.register_forward_hook(post))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return values


def same(a: torch.Tensor, b: torch.Tensor) -> str:
    """"exact" (same shape and values), "perm" (same values in another order or shape), or ""."""
    if a is None or b is None or a.numel() != b.numel() or a.dtype != b.dtype:
        return ""
    a64, b64 = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    scale = max(float(a64.abs().max()) if a64.numel() else 0.0, 1e-12)
    if a.shape == b.shape and torch.allclose(a64, b64, rtol=1e-5, atol=1e-6 * scale):
        return "exact"
    if torch.allclose(a64.sort().values, b64.sort().values, rtol=1e-5, atol=1e-6 * scale):
        return "perm"
    return ""


def per_channel_var(x: torch.Tensor, axis: int) -> torch.Tensor:
    v = x.detach().double().movedim(axis, 0).reshape(x.shape[axis], -1)
    return v.var(1, correction=0).sort().values


def per_channel_factor(branch: torch.Tensor, operand: torch.Tensor, axis: int | None) -> float | None:
    """The k with operand == k * branch per channel (on ``axis``), as max |k - 1|; None if no such k exists."""
    if axis is None or branch.shape != operand.shape:
        return None
    b = branch.detach().double().movedim(axis, 0).reshape(branch.shape[axis], -1)
    o = operand.detach().double().movedim(axis, 0).reshape(operand.shape[axis], -1)
    k = (b * o).sum(1) / (b * b).sum(1).clamp_min(1e-300)
    if not torch.allclose(k[:, None] * b, o, rtol=1e-4, atol=1e-6 * float(o.abs().max().clamp_min(1e-12))):
        return None
    return float((k - 1).abs().max())


def rel(a: float, b: float, x: torch.Tensor) -> float:
    """Relative error of ``a`` against the truth ``b``; a variance at float32 rounding level (1e-10 of the
    tensor's mean square: a branch constant over a 2-sample 1x1 map) only counts as that floor."""
    floor = 1e-10 * float(x.detach().double().square().mean())
    return abs(a - b) / max(abs(b), floor, 1e-300)


# ---- one model ---------------------------------------------------------------------------------------------


@dataclass
class TapCheck:
    name: str
    rule: str
    output: str = ""  # exact / perm / post-act / "" (no add matched)
    event: int = -1
    branch: str = ""  # pre / post / xk / none / stem
    axis_ok: bool | None = None
    spp_axis: int | None = None
    oracle_axis: int | None = None
    err_var: float | None = None
    err_sq_mean: float | None = None
    err_res: float | None = None
    note: str = ""
    refused: bool = False

    @property
    def wrong_number(self) -> bool:
        return any(e is not None and e > REL_TOL for e in (self.err_var, self.err_sq_mean, self.err_res))

    @property
    def ok(self) -> bool:
        return (
            bool(self.output)
            and self.branch == "pre"
            and self.axis_ok is True
            and not self.wrong_number
            and self.err_res is not None
        )


@dataclass
class Survey:
    id: str
    times: dict[str, float] = field(default_factory=dict)
    adds_identity: int = 0
    adds_parallel: int = 0
    adds_weightless: int = 0
    oracle_unknown_axis: int = 0
    taps: list[TapCheck] = field(default_factory=list)
    missed_identity: list[str] = field(default_factory=list)
    missed_parallel: list[str] = field(default_factory=list)
    error: str = ""
    events: list[AddEvent] = field(default_factory=list)
    stem: str = ""  # "ok", "wrongax", "wrongnum", "?" (no add operand holds the stem tensor, or axis unknown)


def check_tap(tap, row, values, events, used: set[int]) -> TapCheck:
    from spp.moments import channel_axis
    from spp.taps import Difference, Site

    c = TapCheck(name=tap.name, rule=tap.rule)
    if row.get("check") == "refused":
        c.note = "REFUSED " + row["note"][:160]
        c.refused = True
        return c
    out = values.get(tap.output)
    if out is None:
        c.note = f"output site {tap.output} never ran"
        return c
    # the add whose sum this is (or the sum after its activation)
    match, matched_tensor = None, None
    for e in events:
        kind = same(out, e.tensors.out)
        if not kind:
            kind = next((f"post-{n}" for n, t in e.tensors.post if same(out, t)), "")
            tensor = next((t for n, t in e.tensors.post if same(out, t)), None)
        else:
            tensor = e.tensors.out
        if kind and (match is None or (match.index in used and e.index not in used)):
            match, matched_tensor, c.output = e, tensor, kind
            if e.index not in used:
                break
    if isinstance(tap.residual, Site):
        res = values.get(tap.residual)
        res_axis_dim = row["axis"] if tap.residual_channel_dim is None else tap.residual_channel_dim
    elif isinstance(tap.residual, Difference):
        m, s = values.get(tap.residual.minuend), values.get(tap.residual.subtrahend)
        res = (m.double() - s.double()).to(m.dtype) if m is not None and s is not None and m.shape == s.shape else None
        if res is not None and tap.residual_scale:
            from spp.hooks import _scale_value
            res = res / _scale_value(model_ref[0], tap.residual_scale).to(res.dtype)
        res_axis_dim = row["axis"]
    else:
        res = None
        res_axis_dim = None
    if match is None:
        # which add's branch is it, then?
        for e in events:
            if res is not None and same(res, e.tensors.branch):
                c.note = f"output matches no sum; branch is add #{e.index} ({e.module})"
                break
        else:
            c.note = "output matches no sum the oracle saw"
        return c
    used.add(match.index)
    c.event = match.index
    # axis of the output
    c.oracle_axis = match.channel_axis
    c.spp_axis = row["axis"]
    if match.channel_axis is not None:
        if c.output == "exact" or c.output.startswith("post"):
            c.axis_ok = c.spp_axis == match.channel_axis and out.shape == matched_tensor.shape
        else:  # a permuted read: the per-channel variances must be the same multiset
            a, b = per_channel_var(out, c.spp_axis), per_channel_var(matched_tensor, match.channel_axis)
            c.axis_ok = a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-12)
        sq, var = channel_stats(matched_tensor, match.channel_axis)
        c.err_sq_mean = rel(row["avg_sq_mean"], sq, matched_tensor)
        c.err_var = rel(row["avg_var"], var, matched_tensor)
    # the branch
    t = match.tensors
    operand = (t.lhs, t.rhs)[match.branch]
    if res is None:
        c.branch = "none"
        c.note = "branch site never ran" if tap.residual is not None else ""
    elif same(res, t.branch):
        c.branch = "pre"
    elif same(res, operand):
        c.branch = "post"
    else:
        k = per_channel_factor(t.branch, res, match.branch_axis) if res.shape == t.branch.shape else None
        c.branch = f"x{k:.2g}" if k is not None else "none"
    if match.branch_axis is not None:
        _, res_var = channel_stats(t.branch, match.branch_axis)
        c.err_res = rel(row["res_avg_var"], res_var, t.branch)
        # (a branch the rule reads in another layout -- transposed, channels-last -- is checked by its number)
        same_layout = res is not None and c.branch == "pre" and res.shape == t.branch.shape \
            and not tap.residual_transforms and tap.residual_channel_dim is None and c.output == "exact"
        if same_layout and res_axis_dim is not None and res_axis_dim < res.ndim \
                and channel_axis(res, res_axis_dim) != match.branch_axis:
            c.axis_ok = False
            c.note = (c.note + "; " if c.note else "") + "branch axis differs"
    return c


def check_stem(tap, row, values, watched) -> str:
    """The stem is the first block's input: the oracle watched that module's input and proved its axis."""

    x, truth = values.get(tap.output), watched.get(tap.output.module)
    if x is None or truth is None or truth.channel_axis is None or same(x, truth.tensor) != "exact":
        return "?"
    sq, var = channel_stats(truth.tensor, truth.channel_axis)
    if row.get("check") == "refused":
        return "refused"
    if row["axis"] != truth.channel_axis % x.ndim:
        return "wrongax"
    wrong = max(rel(row["avg_var"], var, x), rel(row["avg_sq_mean"], sq, x)) > REL_TOL
    return "wrongnum" if wrong else "ok"


def survey_one(zm) -> Survey:
    import spp.hooks
    from spp.discovery import find_taps
    from spp.errors import SppError
    from spp.taps import Difference, Site

    sv = Survey(zm.id)
    t0 = time.perf_counter()
    model, x = zm.build()
    model_ref[0] = model
    sv.times["build"] = time.perf_counter() - t0
    liven(model)
    with torch.no_grad():
        model(x)  # warm-up (lazy init, caches)
        t0 = time.perf_counter()
        model(x)
        sv.times["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        taps = find_taps(model)
    except SppError as exc:
        sv.error = f"refused: {exc}"
        taps = []
    sv.times["discover"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced = trace(model, (x,), keep_tensors=True, watch=[taps[0].module] if taps else [])
    sv.times["oracle"] = time.perf_counter() - t0
    events = sv.events = traced.events
    sv.adds_identity = sum(e.kind == "identity" for e in events)
    sv.adds_parallel = sum(e.kind == "parallel" for e in events)
    sv.adds_weightless = sum(e.kind == "weightless" for e in events)
    sv.oracle_unknown_axis = sum(e.channel_axis is None for e in events if e.kind != "weightless")
    if taps:
        t0 = time.perf_counter()
        try:
            rec = spp.hooks.record(model, x, mode="eval", taps=taps)
        except SppError as exc:
            sv.error = f"record refused: {exc}"
            rec = None
        except Exception as exc:
            sv.error = f"record crashed: {type(exc).__name__}: {exc}"
            rec = None
        sv.times["record"] = time.perf_counter() - t0
        if rec is not None:
            sites = set()
            for tap in taps:
                sites.add(tap.output)
                if isinstance(tap.residual, Site):
                    sites.add(tap.residual)
                elif isinstance(tap.residual, Difference):
                    sites |= {tap.residual.minuend, tap.residual.subtrahend}
            values = capture_sites(model, sites, x)
            used: set[int] = set()
            sv.stem = check_stem(taps[0], rec.rows[0], values, traced.inputs)
            for tap, row in zip(taps[1:], rec.rows[1:], strict=True):
                sv.taps.append(check_tap(tap, row, values, events, used))
            matched = {c.event for c in sv.taps}
            for e in events:
                if e.index not in matched and e.kind != "weightless":
                    (sv.missed_identity if e.kind == "identity" else sv.missed_parallel).append(
                        f"#{e.index} {e.module or '<model>'}"
                    )
    else:
        sv.missed_identity = [f"#{e.index} {e.module}" for e in events if e.kind == "identity"]
        sv.missed_parallel = [f"#{e.index} {e.module}" for e in events if e.kind == "parallel"]
    return sv


def verdict(sv: Survey) -> str:
    """One line: what a user of spp would get."""
    if not sv.adds_identity and not sv.adds_parallel:
        return "correctly refused" if sv.error.startswith("refused") else "WRONG: taps on a model with no add"
    if sv.error:
        return "refused" if sv.error.startswith("refused") else "error"
    bad = sum(not c.ok for c in sv.taps)
    if any(c.wrong_number for c in sv.taps) or sv.stem in ("wrongax", "wrongnum"):
        return "SILENTLY WRONG"
    return "all verified" if not bad and not sv.missed_identity else "incomplete"



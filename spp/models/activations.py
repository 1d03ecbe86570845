"""Activations by name or expression, and the constants that make them preserve signal on N(0,1) inputs.

``gamma(spec)`` = 1 / std(g(z)) for z ~ N(0,1): Scaled WS multiplies its weights by it, because weight
standardisation removes the mean of g(z) and leaves only its variance. ``second_moment_gain(spec)`` =
1 / sqrt(E[g(z)^2]) is the matching He-style gain for convs without WS (sqrt(2) for relu), where the mean passes.

A spec is a built-in name (``ACTIVATIONS``), a ``torch.nn.functional`` / ``torch`` / ``torch.special`` function by
name (``"hardswish"``, ``"torch.erf"``, ``"F.mish"``), or an expression in ``x``
(``"x * torch.sigmoid(1.702 * x)"``). Expressions are parsed with ``ast`` and interpreted node by node -- never
``eval``'d -- allowing only numbers, ``x``, arithmetic, comparisons and calls of allow-listed element-wise functions
of torch, ``F`` (torch.nn.functional) and ``math``; anything else is a one-line ``SppError``.

The Gaussian integrals are computed by adaptive Gauss-Kronrod (G7/K15) quadrature in float64 on [-16, 16], which
bisects panels until every panel's Kronrod and Gauss estimates agree to 1e-13 of the integral; a kink or jump is
found by bisection, so no spec needs to say where its function bends. Closed forms (piecewise polynomials and
exponentials against the Gaussian, GELU by Stein's lemma, erf by Price's theorem) are given beside it where they
exist, with DeepMind's tabulated constants (which timm copies) and how far sampling can move them.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from spp.errors import SppError, close_matches

ActivationFn = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, ActivationFn] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "log_sigmoid": F.logsigmoid,
}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]

# ---- what an expression may call ----------------------------------------------------------------------------------
# Element-wise, side-effect-free functions only: nothing that reads or writes files, allocates by a size argument,
# changes global state or draws random numbers.
_TORCH_FUNCTIONS = (
    "abs", "absolute", "acos", "arccos", "acosh", "arccosh", "add", "asin", "arcsin", "asinh", "arcsinh", "atan",
    "arctan", "atan2", "arctan2", "atanh", "arctanh", "ceil", "celu", "clamp", "clamp_max", "clamp_min", "clip",
    "copysign", "cos", "cosh", "deg2rad", "digamma", "div", "divide", "eq", "erf", "erfc", "erfinv", "exp", "exp2",
    "expm1", "fix", "float_power", "floor", "floor_divide", "fmax", "fmin", "fmod", "frac", "full_like", "ge", "gt",
    "heaviside", "hypot", "i0", "igamma", "igammac", "le", "lerp", "lgamma", "log", "log10", "log1p", "log2",
    "logaddexp", "logaddexp2", "logical_and", "logical_not", "logical_or", "logical_xor", "logit", "lt", "maximum",
    "minimum", "mul", "multiply", "nan_to_num", "ne", "neg", "negative", "ones_like", "polygamma", "pow", "rad2deg",
    "reciprocal", "relu", "remainder", "round", "rsqrt", "selu", "sgn", "sigmoid", "sign", "sin", "sinc", "sinh",
    "sqrt", "square", "sub", "subtract", "tan", "tanh", "true_divide", "trunc", "where", "xlogy", "zeros_like",
)
_F_FUNCTIONS = (
    "celu", "elu", "gelu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh", "leaky_relu", "logsigmoid", "mish",
    "relu", "relu6", "rrelu", "selu", "sigmoid", "silu", "softplus", "softshrink", "softsign", "tanh", "tanhshrink",
    "threshold",
)
_TORCH_CONSTANTS = ("pi", "e", "inf", "nan")
_FORBIDDEN_KEYWORDS = ("out", "inplace", "training", "generator")
_MAX_SPEC_CHARS = 1000
_MAX_NODES = 300


def _allowed_paths() -> dict[str, Any]:
    """Dotted path -> object, for every name an expression may use."""
    paths: dict[str, Any] = {}
    for name in _TORCH_FUNCTIONS:
        if hasattr(torch, name):
            paths[f"torch.{name}"] = getattr(torch, name)
    for name in _TORCH_CONSTANTS:
        paths[f"torch.{name}"] = getattr(torch, name, getattr(math, name))
    for name in _F_FUNCTIONS:
        if hasattr(F, name):
            paths[f"F.{name}"] = paths[f"torch.nn.functional.{name}"] = getattr(F, name)
    for name in dir(torch.special):
        obj = getattr(torch.special, name)
        if not name.startswith("_") and callable(obj) and not isinstance(obj, type):
            paths[f"torch.special.{name}"] = obj
    for name in dir(math):
        if not name.startswith("_"):
            paths[f"math.{name}"] = getattr(math, name)
    return paths


_PATHS = _allowed_paths()


def _bare_function(name: str) -> ActivationFn | None:
    """A function of torch.nn.functional, torch or torch.special by its bare name ("hardswish", "erf")."""
    for prefix in ("F", "torch", "torch.special"):
        fn = _PATHS.get(f"{prefix}.{name}")
        if fn is not None and callable(fn):
            return fn
    return None


# ---- the expression interpreter -----------------------------------------------------------------------------------
class _Interpreter:
    """Evaluates a parsed expression for a tensor ``x``. No ``eval``, no builtins: each node type that may appear
    has a method; any other node is refused, so the only reachable objects are ``x``, numbers and ``_PATHS``."""

    _BINOPS: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {
        ast.Add: lambda a, b: a + b,
        ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b,
        ast.FloorDiv: lambda a, b: a // b,
        ast.Mod: lambda a, b: a % b,
        ast.Pow: lambda a, b: a**b,
    }
    _UNARY: ClassVar[dict[type, Callable[[Any], Any]]] = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}
    _COMPARE: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {
        ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b,
        ast.Gt: lambda a, b: a > b,
        ast.GtE: lambda a, b: a >= b,
        ast.Eq: lambda a, b: a == b,
        ast.NotEq: lambda a, b: a != b,
    }

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def refuse(self, why: str) -> SppError:
        return SppError(f"activation expression {self.spec!r}: {why}; allowed: numbers, x, + - * / // % **, "
                        "comparisons, and calls of element-wise torch / F / math functions")

    def check(self, tree: ast.Expression) -> None:
        """Refuse a disallowed tree before anything runs (so a bad sub-expression is never half-evaluated)."""
        nodes = list(ast.walk(tree))
        if len(nodes) > _MAX_NODES:
            raise self.refuse(f"more than {_MAX_NODES} syntax nodes")
        for node in nodes:
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                raise self.refuse(f"no access to underscore attributes ({node.attr!r})")
            if isinstance(node, ast.Name) and node.id not in ("x", "torch", "F", "math"):
                raise self.refuse(f"unknown name {node.id!r} (only x, torch, F and math)")
            if isinstance(node, (ast.Attribute, ast.Name)) and not isinstance(node.ctx, ast.Load):
                raise self.refuse("assignment is not an expression of x")
        self.eval(tree.body, dry=True)

    def path(self, node: ast.expr) -> str:
        """'torch.special.erf' for a chain of attributes on torch / F / math; refuses anything else."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id == "x":
            raise self.refuse("attributes only of torch, F and math")
        dotted = ".".join([node.id, *reversed(parts)])
        if dotted not in _PATHS:
            raise self.refuse(f"{dotted} is not an allowed function or constant{close_matches(dotted, _PATHS)}")
        return dotted

    def eval(self, node: ast.expr, x: Any = None, *, dry: bool = False) -> Any:
        """The value of ``node``; ``dry``: only check that every node is allowed (``x`` is then a placeholder)."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.refuse(f"constant {node.value!r} is not a number")
            return float(node.value)  # ints become floats: 10**10**10 overflows instead of running for ever
        if isinstance(node, ast.Name):
            if node.id != "x":
                raise self.refuse(f"{node.id} is a module, not a value")
            return x
        if isinstance(node, ast.Attribute):
            value = _PATHS.get(self.path(node))
            if value is None or callable(value):
                raise self.refuse(f"{self.path(node)} is not a number (call functions, e.g. torch.erf(x))")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in self._BINOPS:
            a, b = self.eval(node.left, x, dry=dry), self.eval(node.right, x, dry=dry)
            return None if dry else self._BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in self._UNARY:
            a = self.eval(node.operand, x, dry=dry)
            return None if dry else self._UNARY[type(node.op)](a)
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in self._COMPARE:
                raise self.refuse("one comparison at a time (a < x < b is not element-wise)")
            a, b = self.eval(node.left, x, dry=dry), self.eval(node.comparators[0], x, dry=dry)
            return None if dry else self._COMPARE[type(node.ops[0])](a, b)
        if isinstance(node, ast.Call):
            return self.call(node, x, dry=dry)
        raise self.refuse(f"{type(node).__name__} is not allowed")

    def call(self, node: ast.Call, x: Any, *, dry: bool) -> Any:
        if not isinstance(node.func, ast.Attribute):
            raise self.refuse("call functions by their module (torch.erf, F.gelu, math.sqrt)")
        dotted = self.path(node.func)
        fn = _PATHS.get(dotted)
        if fn is None or not callable(fn):
            raise self.refuse(f"{dotted} is not a function")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.refuse("no *args")
            args.append(self.argument(arg, x, dry=dry))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.refuse("no **kwargs")
            if kw.arg in _FORBIDDEN_KEYWORDS or kw.arg.startswith("_"):
                raise self.refuse(f"keyword {kw.arg}= is not allowed (it would change x or global state)")
            kwargs[kw.arg] = self.argument(kw.value, x, dry=dry)
        if dry:
            return None
        return fn(*args, **kwargs)

    def argument(self, node: ast.expr, x: Any, *, dry: bool) -> Any:
        """A call argument: an expression, or a short string option (``approximate="tanh"``)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if len(node.value) > 32:
                raise self.refuse("string arguments are short options, at most 32 characters")
            return node.value
        return self.eval(node, x, dry=dry)


@dataclass(frozen=True)
class ParsedActivation:
    """A spec resolved to a function; ``name`` is the canonical name when the spec names a known function with its
    default arguments (closed forms and tabulated constants are looked up by it), else None."""

    spec: str
    fn: ActivationFn
    name: str | None


# Canonical names of the functions that several specs reach (torch.relu, F.relu, "relu" ...).
_ALIASES = {"swish": "silu", "logsigmoid": "log_sigmoid", "expit": "sigmoid", "absolute": "abs", "sgn": "sign",
            "negative": "neg", "arctan": "atan", "arcsinh": "asinh"}


def _canonical(name: str) -> str:
    name = name.rsplit(".", 1)[-1]
    return _ALIASES.get(name, name)


@cache
def parse_activation(spec: str) -> ParsedActivation:
    """Resolve ``spec`` (a name, a dotted torch/F function, or an expression in x) to a function; SppError if the
    spec is unknown or not allowed. Cached: resolving a name costs a dict lookup after the first time."""
    if not isinstance(spec, str) or not spec.strip():
        raise SppError(f"an activation must be a non-empty string, not {spec!r}")
    text = spec.strip()
    if text in ACTIVATIONS:
        return ParsedActivation(spec, ACTIVATIONS[text], "silu" if text == "swish" else text)
    if text.isidentifier() and text not in ("x", "torch", "F", "math"):
        fn = _bare_function(text)
        if fn is None:
            known = dict.fromkeys([*ACTIVATIONS, *(p.rsplit(".", 1)[-1] for p in _PATHS if callable(_PATHS[p]))])
            raise SppError(f"unknown activation {text!r}{close_matches(text, known)}; known: "
                           f"{', '.join(sorted(ACTIVATIONS))}, any torch.nn.functional or torch function by name, "
                           "or an expression in x such as 'x * torch.sigmoid(1.702 * x)'")
        return ParsedActivation(spec, fn, _canonical(text))
    if len(text) > _MAX_SPEC_CHARS:
        raise SppError(f"activation expression is longer than {_MAX_SPEC_CHARS} characters")
    interpreter = _Interpreter(text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise interpreter.refuse(f"not a Python expression ({exc.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise interpreter.refuse("too deeply nested") from None
    if isinstance(tree.body, ast.Attribute):  # "torch.erf", "F.hardswish": the function itself
        interpreter.check(ast.Expression(body=ast.Constant(0.0)))
        dotted = interpreter.path(tree.body)
        fn = _PATHS.get(dotted)
        if fn is None or not callable(fn):
            raise interpreter.refuse(f"{dotted} is a constant, not a function of x")
        return ParsedActivation(spec, fn, _canonical(dotted))
    try:
        interpreter.check(tree)
    except RecursionError:
        raise interpreter.refuse("too deeply nested") from None
    body = tree.body

    def expression(x: torch.Tensor) -> torch.Tensor:
        try:
            value = interpreter.eval(body, x)
        except SppError:
            raise
        except Exception as exc:  # a torch or math error inside the expression: say which, in one line
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise interpreter.refuse(f"evaluating it failed: {type(exc).__name__}: {first_line}") from None
        if isinstance(value, (int, float)):
            value = torch.full_like(x, float(value))
        if not isinstance(value, torch.Tensor) or value.shape != x.shape:
            raise interpreter.refuse("it must give one value per element of x (an element-wise function)")
        if value.dtype == torch.bool:
            value = value.to(x.dtype)
        if value.is_complex():
            raise interpreter.refuse("it gives complex values")
        return value

    return ParsedActivation(spec, expression, None)


def get_activation(spec: str) -> ActivationFn:
    """The function a spec names (see ``parse_activation``)."""
    return parse_activation(spec).fn


# ---- Gaussian integrals -------------------------------------------------------------------------------------------
# Gauss-Kronrod 7/15 nodes on [-1, 1] (positive half, descending) and weights (QUADPACK's qk15).
_XK = (0.991455371120812639206854697526329, 0.949107912342758524526189684047851, 0.864864423359769072789712788640926,
       0.741531185599394439863864773280788, 0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
       0.207784955007898467600689403773245, 0.0)
_WK = (0.022935322010529224963732008058970, 0.063092092629978553290700663189204, 0.104790010322250183839876322541518,
       0.140653259715525918745189590510238, 0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
       0.204432940075298892414161999234649, 0.209482141084727828012999174891714)
_WG = (0.129484966168869693270611432679082, 0.279705391489276667901467771423780, 0.381830050505118944950369775488975,
       0.417959183673469387755102040816327)
_HALF_WIDTH = 16.0  # phi(16) = 1e-56: beyond it nothing that grows slower than exp(x^2/4) contributes
_TOLERANCE = 1e-13  # per-panel agreement of the Kronrod and Gauss estimates, relative to the integral
_MAX_ROUNDS = 80
_MAX_ACTIVE_PANELS = 2048


@dataclass(frozen=True)
class GaussianMoments:
    """Moments of g(z), z ~ N(0,1): mean, variance, and the 3rd/4th central moments (for sampling errors); ``error``
    bounds the quadrature's absolute error on the variance (the sum of the panels' |Kronrod - Gauss|)."""

    mean: float
    variance: float
    central3: float
    central4: float
    error: float

    @property
    def second_moment(self) -> float:
        return self.variance + self.mean * self.mean


def _nodes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xk = torch.tensor(_XK, dtype=torch.float64)
    nodes = torch.cat([-xk[:-1], xk.flip(0)])  # 15 nodes, ascending
    wk = torch.tensor(_WK, dtype=torch.float64)
    wk15 = torch.cat([wk[:-1], wk.flip(0)])
    gauss_index = torch.tensor([1, 3, 5, 7, 9, 11, 13])  # the 7 Gauss nodes among the 15
    wg = torch.tensor(_WG, dtype=torch.float64)
    wg7 = torch.cat([wg[:-1], wg.flip(0)])
    return nodes, wk15, gauss_index, wg7


def integrate_gaussian(fn: ActivationFn, spec: str = "g") -> GaussianMoments:
    """E[g(z)^k] for z ~ N(0,1) by adaptive Gauss-Kronrod on [-16, 16] in float64; SppError when g is not finite
    somewhere there, is not element-wise, or grows too fast for E[g^2] to exist."""
    nodes, wk, gauss_index, wg = _nodes()
    edges = torch.arange(-_HALF_WIDTH, _HALF_WIDTH + 0.25, 0.5, dtype=torch.float64)  # kinks at k/2 fall on edges
    lo, hi = edges[:-1], edges[1:]
    done: list[tuple[torch.Tensor, ...]] = []  # (nodes, half widths, g at nodes) of accepted panels
    scales: list[float] = []  # the size of each integral (of |g| phi and g^2 phi), from the first round
    pending_error = 0.0
    for _ in range(_MAX_ROUNDS):
        center, half = (lo + hi) / 2, (hi - lo) / 2
        x = center[:, None] + half[:, None] * nodes[None, :]
        g = _evaluate(fn, x, spec)
        phi = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        ok = torch.ones_like(half, dtype=torch.bool)
        errors = torch.zeros_like(half)
        for power in (1, 2):
            f = g**power * phi
            kronrod = half * (f @ wk)
            error = (kronrod - half * (f[:, gauss_index] @ wg)).abs()
            if len(scales) < 2:
                scales.append(max(float((half * ((f.abs()) @ wk)).sum()), 1e-300))
            tol = _TOLERANCE * scales[power - 1] * half / _HALF_WIDTH  # the tolerance shared out by width
            ok &= error <= tol
            errors += error
        done.append((x[ok], half[ok], g[ok]))
        if bool(ok.all()):
            pending_error = 0.0
            break
        bad = ~ok
        pending_error = float(errors[bad].sum())
        mid = center[bad]
        lo, hi = torch.cat([lo[bad], mid]), torch.cat([mid, hi[bad]])
        if lo.numel() > _MAX_ACTIVE_PANELS:  # a singularity, not a kink or a jump (those keep a few panels busy)
            break
    x = torch.cat([d[0] for d in done])
    half = torch.cat([d[1] for d in done])
    g = torch.cat([d[2] for d in done])
    weights = half[:, None] * wk[None, :] * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def expect(values: torch.Tensor) -> float:
        return float((weights * values).sum())

    mass = expect(torch.ones_like(g))  # 1 - 2 Q(16), 1 to 1e-15
    mean = expect(g) / mass
    centred = g - mean
    variance = expect(centred**2) / mass
    if not math.isfinite(variance) or _tail_share(x, weights * g * g) > 1e-12:
        raise SppError(f"activation {spec!r}: E[g(z)^2] does not converge (g grows too fast for a Gaussian input)")
    if pending_error > 1e-9 * max(abs(variance), 1e-300):
        raise SppError(f"activation {spec!r}: the Gaussian integral did not converge (error {pending_error:.1e}); "
                       "is g finite and piecewise smooth?")
    return GaussianMoments(mean, variance, expect(centred**3) / mass, expect(centred**4) / mass, pending_error)


def _evaluate(fn: ActivationFn, x: torch.Tensor, spec: str) -> torch.Tensor:
    flat = x.reshape(-1)
    try:
        with torch.no_grad():
            g = fn(flat.clone())
    except SppError:
        raise
    except Exception as exc:
        raise SppError(f"activation {spec!r} failed on a float64 tensor: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(g, torch.Tensor) or g.shape != flat.shape:
        raise SppError(f"activation {spec!r} is not element-wise: it must return one value per input")
    g = g.to(torch.float64)
    bad = ~torch.isfinite(g)
    if bool(bad.any()):
        where = float(flat[bad][0])
        raise SppError(f"activation {spec!r} is not finite at x = {where:.6g}: its Gaussian moments do not exist")
    return g.reshape(x.shape)


def _tail_share(x: torch.Tensor, mass: torch.Tensor) -> float:
    """The share of E[g^2] in the outer unit of [-16, 16]: not ~0 means g^2 phi has not decayed at the interval's
    ends, so the integral over the whole real line would differ (or diverge)."""
    total = float(mass.sum())
    return float(mass[x.abs() > _HALF_WIDTH - 1.0].sum()) / total if total > 0 else 0.0


@cache
def moments(spec: str) -> GaussianMoments:
    """The Gaussian moments of the activation ``spec``, computed once per spec."""
    return integrate_gaussian(get_activation(spec), spec)


def gaussian_moments(spec: str) -> tuple[float, float]:
    """(E[g(z)], E[g(z)^2]) for z ~ N(0,1)."""
    m = moments(spec)
    return m.mean, m.second_moment


def gamma(spec: str) -> float:
    """1 / std(g(z)): makes g variance-preserving after a zero-mean (standardised) weight. relu: 1.712859."""
    variance = moments(spec).variance
    if variance <= 0:
        raise SppError(f"activation {spec!r} is constant on N(0,1) inputs: gamma = 1/std does not exist")
    return 1.0 / math.sqrt(variance)


def second_moment_gain(spec: str) -> float:
    """1 / sqrt(E[g(z)^2]): the He-init gain for g (sqrt(2) for relu), right when the weights keep the mean."""
    second = moments(spec).second_moment
    if second <= 0:
        raise SppError(f"activation {spec!r} is zero on N(0,1) inputs: its He gain does not exist")
    return 1.0 / math.sqrt(second)


# ---- closed forms -------------------------------------------------------------------------------------------------
_SQRT2 = math.sqrt(2.0)


def _pdf(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _prob(a: float, b: float) -> float:
    """P(a < z < b), with erfc on the side that keeps precision in the tails."""
    if a >= 0:
        return 0.5 * (math.erfc(a / _SQRT2) - math.erfc(b / _SQRT2))
    if b <= 0:
        return 0.5 * (math.erfc(-b / _SQRT2) - math.erfc(-a / _SQRT2))
    return 1.0 - 0.5 * (math.erfc(-a / _SQRT2) + math.erfc(b / _SQRT2))


def _power(a: float, b: float, n: int) -> float:
    """Integral of x^n phi(x) over (a, b): M_n = [a^(n-1) phi(a) - b^(n-1) phi(b)] + (n-1) M_(n-2)."""
    if n == 0:
        return _prob(a, b)
    if n == 1:
        return _pdf(a) - _pdf(b)

    def edge(t: float) -> float:
        return 0.0 if math.isinf(t) else t ** (n - 1) * _pdf(t)

    return edge(a) - edge(b) + (n - 1) * _power(a, b, n - 2)


def _exp(a: float, b: float, k: float) -> float:
    """Integral of exp(k x) phi(x) over (a, b) = exp(k^2 / 2) P(a - k < z < b - k)."""
    return math.exp(0.5 * k * k) * _prob(a - k, b - k)


def _poly(a: float, b: float, coefficients: tuple[float, ...]) -> float:
    """Integral of (c0 + c1 x + c2 x^2 + ...) phi(x) over (a, b)."""
    return sum(c * _power(a, b, n) for n, c in enumerate(coefficients) if c)


_INF = math.inf
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _elu(alpha: float, scale: float = 1.0) -> tuple[float, float]:
    """x for x > 0, alpha (e^x - 1) below: the negative half by the exponential integral."""
    m1 = _power(0, _INF, 1) + alpha * (_exp(-_INF, 0, 1) - _prob(-_INF, 0))
    m2 = _power(0, _INF, 2) + alpha**2 * (_exp(-_INF, 0, 2) - 2 * _exp(-_INF, 0, 1) + _prob(-_INF, 0))
    return scale * m1, scale**2 * m2


def _leaky(slope: float) -> tuple[float, float]:
    return (_power(0, _INF, 1) + slope * _power(-_INF, 0, 1), _power(0, _INF, 2) + slope**2 * _power(-_INF, 0, 2))


# name -> (E[g], E[g^2]) exactly; each for the function with torch's default arguments.
CLOSED_FORMS: dict[str, Callable[[], tuple[float, float]]] = {
    "identity": lambda: (0.0, 1.0),
    "relu": lambda: (_power(0, _INF, 1), _power(0, _INF, 2)),
    "relu6": lambda: (_power(0, 6, 1) + 6 * _prob(6, _INF), _power(0, 6, 2) + 36 * _prob(6, _INF)),
    "leaky_relu": lambda: _leaky(0.01),
    "abs": lambda: (2 * _power(0, _INF, 1), 1.0),
    "hardtanh": lambda: (-_prob(-_INF, -1) + _power(-1, 1, 1) + _prob(1, _INF),
                         _prob(-_INF, -1) + _power(-1, 1, 2) + _prob(1, _INF)),
    "hardsigmoid": lambda: (_poly(-3, 3, (0.5, 1 / 6)) + _prob(3, _INF),
                            _poly(-3, 3, (0.25, 1 / 6, 1 / 36)) + _prob(3, _INF)),
    "hardswish": lambda: (_poly(-3, 3, (0, 0.5, 1 / 6)) + _power(3, _INF, 1),
                          _poly(-3, 3, (0, 0, 0.25, 1 / 6, 1 / 36)) + _power(3, _INF, 2)),
    "hardshrink": lambda: (0.0, 2 * _power(0.5, _INF, 2)),
    "softshrink": lambda: (0.0, 2 * _poly(0.5, _INF, (0.25, -1.0, 1.0))),
    "elu": lambda: _elu(1.0),
    "celu": lambda: _elu(1.0),
    "selu": lambda: _elu(_SELU_ALPHA, _SELU_SCALE),
    # GELU x Phi(x): E = E[phi(z)] = 1/(2 sqrt(pi)) (Stein's lemma);
    # E[x^2 Phi^2] = E[Phi^2] + E[(Phi^2)''] = 1/3 + 1/(2 pi sqrt 3).
    "gelu": lambda: (1 / (2 * math.sqrt(math.pi)), 1 / 3 + 1 / (2 * math.pi * math.sqrt(3))),
    # E[erf(z)^2] = (2/pi) asin(2/3) (Price's theorem for two erf of correlated Gaussians, correlation 1).
    "erf": lambda: (0.0, 2 / math.pi * math.asin(2 / 3)),
    "sign": lambda: (0.0, 1.0),
    "square": lambda: (1.0, 3.0),
    "exp": lambda: (math.exp(0.5), math.exp(2.0)),
    "sin": lambda: (0.0, (1 - math.exp(-2.0)) / 2),
    "cos": lambda: (math.exp(-0.5), (1 + math.exp(-2.0)) / 2),
}

# DeepMind's nfnets/base.py table, copied by timm (``_nonlin_gamma``): sampled estimates, not integrals.
TABLE_GAMMA: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "softsign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}
# How the table was sampled (NFNets paper, Brock et al. 2021b, appendix): gamma = mean(var(g(x), axis=1)) ** -0.5
# with x of shape (1024, 256): population variances over rows of 256 draws, averaged over 1024 rows. DeepMind's
# "gelu" is JAX's default, the tanh approximation; timm applies the same number to the erf GELU.
TABLE_ROWS, TABLE_ROW_SIZE = 1024, 256


def table_expectation(m: GaussianMoments) -> tuple[float, float]:
    """What the table's estimator gives on average for a function with moments ``m``, and its standard deviation.

    Each row's population variance has mean sigma^2 (n-1)/n and variance ((n-1)/n)^2 (mu4/n - sigma^4 (n-3) /
    (n (n-1))); the average of R rows divides that variance by R; gamma_hat = V^(-1/2) by the delta method."""
    n, rows = TABLE_ROW_SIZE, TABLE_ROWS
    var = m.variance
    expected_v = var * (n - 1) / n
    var_v = ((n - 1) / n) ** 2 * (m.central4 / n - var * var * (n - 3) / (n * (n - 1))) / rows
    expected_gamma = expected_v**-0.5
    return expected_gamma, 0.5 * expected_gamma * math.sqrt(max(var_v, 0.0)) / expected_v


# ---- reports ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GammaReport:
    """Everything ``spp gamma`` prints for one activation.

    ``gamma`` = 1/std(g(z)) and ``mean``/``second_moment`` by quadrature (``quadrature_error``: a bound on gamma's
    absolute error); ``closed_form``: gamma from the closed form where one exists; ``table_value``: DeepMind's/timm's
    constant; ``table_expected`` and ``table_std_error``: what their sampling procedure gives for this function on
    average and how far it scatters, so ``(table_value - table_expected) / table_std_error`` says whether the table
    entry is just sampling noise.
    """

    spec: str
    name: str | None
    gamma: float
    mean: float
    second_moment: float
    closed_form: float | None
    table_value: float | None
    table_expected: float | None
    table_std_error: float | None
    quadrature_error: float

    @property
    def variance(self) -> float:
        return self.second_moment - self.mean * self.mean

    @property
    def he_gain(self) -> float:
        """1/sqrt(E[g^2]): the init gain for convs that keep the mean (``second_moment_gain``)."""
        return 1.0 / math.sqrt(self.second_moment)

    @property
    def table_difference(self) -> float | None:
        """table_value - gamma (the table's deviation from the exact integral)."""
        return None if self.table_value is None else self.table_value - self.gamma

    @property
    def table_z(self) -> float | None:
        """(table_value - table_expected) / table_std_error: |z| < 3 is consistent with sampling."""
        if self.table_value is None or not self.table_std_error:
            return None
        return (self.table_value - (self.table_expected or self.gamma)) / self.table_std_error

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "name": self.name, "gamma": self.gamma, "mean": self.mean,
            "second_moment": self.second_moment, "variance": self.variance, "he_gain": self.he_gain,
            "closed_form": self.closed_form, "table_value": self.table_value,
            "table_difference": self.table_difference, "table_expected": self.table_expected,
            "table_std_error": self.table_std_error, "table_z": self.table_z,
            "quadrature_error": self.quadrature_error,
        }


def closed_form_moments(name: str | None) -> tuple[float, float] | None:
    """(E[g], E[g^2]) in closed form for a canonical name, or None where there is none."""
    form = CLOSED_FORMS.get(name or "")
    return form() if form is not None else None


def gamma_report(spec: str) -> GammaReport:
    """Gamma, the mean and second moment of one activation, with its closed form and table entry if any."""
    parsed = parse_activation(spec)
    m = moments(spec)
    if m.variance <= 0:
        raise SppError(f"activation {spec!r} is constant on N(0,1) inputs: gamma = 1/std does not exist")
    g = 1.0 / math.sqrt(m.variance)
    exact = closed_form_moments(parsed.name)
    closed = None if exact is None else 1.0 / math.sqrt(exact[1] - exact[0] ** 2)
    table = TABLE_GAMMA.get(parsed.name or "") if parsed.name != "gelu_tanh" else TABLE_GAMMA["gelu"]
    expected = std_error = None
    if table is not None and parsed.name != "identity":  # the table's identity entry is exact, not sampled
        expected, std_error = table_expectation(m)
    return GammaReport(
        spec=spec, name=parsed.name, gamma=g, mean=m.mean, second_moment=m.second_moment, closed_form=closed,
        table_value=table, table_expected=expected, table_std_error=std_error,
        quadrature_error=0.5 * g**3 * m.error,
    )


def describe_gamma(specs: list[str] | tuple[str, ...]) -> list[GammaReport]:
    """One ``GammaReport`` per spec, in order (``spp gamma relu gelu 'x * torch.sigmoid(1.702*x)'``)."""
    return [gamma_report(spec) for spec in specs]


def format_gamma_table(reports: list[GammaReport]) -> str:
    """A plain-text table of reports, one row each (the CLI can print it or build a rich table from to_dict)."""
    header = f"{'activation':<28} {'gamma':>10} {'closed form':>11} {'table':>10} {'table-gamma':>11} " \
             f"{'z':>6} {'mean':>10} {'E[g^2]':>10}"
    lines = [header]

    def num(v: float | None, fmt: str = ".6f") -> str:
        return "-" if v is None else format(v, fmt)

    for r in reports:
        lines.append(
            f"{r.spec[:28]:<28} {r.gamma:>10.6f} {num(r.closed_form):>11} {num(r.table_value, '.4f'):>10} "
            f"{num(r.table_difference, '+.6f'):>11} {num(r.table_z, '+.1f'):>6} {r.mean:>10.6f} "
            f"{r.second_moment:>10.6f}"
        )
    return "\n".join(lines)


class Activation(nn.Module):
    """A named activation as a module, so it shows up (and can be hooked) in ``named_modules``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name

"""`gamma(spec)`: Gaussian constants of any activation, against closed forms derived here, an independent
integral, and DeepMind's sampled table; expressions are parsed safely or refused."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from spp.errors import SppError
from spp.models import create_model
from spp.models.activations import (
    TABLE_GAMMA,
    Activation,
    describe_gamma,
    format_gamma_table,
    gamma,
    gamma_report,
    get_activation,
    moments,
    parse_activation,
    second_moment_gain,
)

PI, E = math.pi, math.e


def _pdf(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * PI)


def _upper(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def _trapezoid(fn) -> tuple[float, float, float]:
    """(mean, variance, 4th central moment) of fn(z), z ~ N(0,1), by the trapezoid rule on [-12, 12] with step
    5e-5 (every kink of the built-in activations, at multiples of 1/2, is a grid point): error ~1e-9."""
    z = torch.linspace(-12.0, 12.0, 480_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * PI)
    g = fn(z).to(torch.float64)
    mean = float(torch.trapezoid(g * w, z))
    c = g - mean
    return mean, float(torch.trapezoid(c * c * w, z)), float(torch.trapezoid(c**4 * w, z))


# ---- closed forms ---------------------------------------------------------------------------------------------------
LEAK = 0.01
CLOSED = {
    # relu: E = phi(0) = 1/sqrt(2 pi), E[g^2] = 1/2.
    "relu": (1 / math.sqrt(2 * PI), 0.5 - 1 / (2 * PI)),
    # |z|: E = 2 phi(0), E[g^2] = 1.
    "abs": (math.sqrt(2 / PI), 1 - 2 / PI),
    # leaky: E = (1 - s) phi(0), E[g^2] = (1 + s^2) / 2.
    "leaky_relu": ((1 - LEAK) / math.sqrt(2 * PI), (1 + LEAK**2) / 2 - (1 - LEAK) ** 2 / (2 * PI)),
    "identity": (0.0, 1.0),
    "sign": (0.0, 1.0),
    # z^2 is chi-square(1): mean 1, variance 2.
    "square": (1.0, 2.0),
    # e^z is log-normal: mean e^(1/2), variance e^2 - e.
    "exp": (math.sqrt(E), E * E - E),
    # E[sin^2 z] = (1 - E[cos 2z]) / 2 = (1 - e^-2) / 2; E[cos z] = e^(-1/2), E[cos^2] = (1 + e^-2) / 2.
    "sin": (0.0, (1 - math.exp(-2)) / 2),
    "cos": (math.exp(-0.5), (1 + math.exp(-2)) / 2 - math.exp(-1)),
    # GELU z Phi(z): E = E[phi(z)] = 1/(2 sqrt pi) by Stein's lemma; E[z^2 Phi^2] = E[Phi^2] + E[(Phi^2)'']
    # = 1/3 + E[phi^2] = 1/3 + 1/(2 pi sqrt 3) (E[Phi(z)^2] = P(two correlated-1/2 Gaussians <= 0) = 1/3).
    "gelu": (1 / (2 * math.sqrt(PI)), 1 / 3 + 1 / (2 * PI * math.sqrt(3)) - 1 / (4 * PI)),
    # erf: odd; E[erf(z)^2] = (2/pi) asin(2/3).
    "erf": (0.0, 2 / PI * math.asin(2 / 3)),
    # SELU's constants are the solution of mean 0, variance 1 on N(0, 1) inputs.
    "selu": (0.0, 1.0),
    # hardshrink (jumps at +-1/2, where a trapezoid rule would be off by ~1e-6): E[g^2] = 2 (phi(1/2)/2 + Q(1/2)).
    "hardshrink": (0.0, 2 * (0.5 * _pdf(0.5) + _upper(0.5))),
    # A step at a = 0.1234: Bernoulli(Q(a)).
    "torch.where(x > 0.1234, 1.0, 0.0)": (_upper(0.1234), _upper(0.1234) * (1 - _upper(0.1234))),
    # z 1[z > 0.3]: E = phi(0.3), E[g^2] = 0.3 phi(0.3) + Q(0.3).
    "(x > 0.3) * x": (_pdf(0.3), 0.3 * _pdf(0.3) + _upper(0.3) - _pdf(0.3) ** 2),
}


@pytest.mark.parametrize("spec", list(CLOSED))
def test_gamma_matches_closed_forms(spec):
    mean, variance = CLOSED[spec]
    m = moments(spec)
    assert m.mean == pytest.approx(mean, abs=1e-9)
    assert gamma(spec) == pytest.approx(variance**-0.5, rel=1e-9)
    report = gamma_report(spec)
    if report.closed_form is not None:  # the library's own closed form, where it has one
        assert report.closed_form == pytest.approx(variance**-0.5, rel=1e-12)


def test_known_constants():
    """relu sqrt(2 / (1 - 1/pi)) = 1.712859; the exact integrals the facts file quotes; He gain sqrt(2)."""
    assert gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / PI)), rel=1e-12)
    assert gamma("relu") == pytest.approx(1.712859, abs=5e-7)
    for name, value in (("silu", 1.787187), ("gelu", 1.700926), ("tanh", 1.592537)):
        assert gamma(name) == pytest.approx(value, abs=5e-7), name
    assert second_moment_gain("relu") == pytest.approx(math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("spec", ["silu", "mish", "tanh", "sigmoid", "softplus", "softsign", "log_sigmoid",
                                  "gelu_tanh", "elu", "celu", "relu6", "hardswish", "hardsigmoid", "hardtanh",
                                  "softshrink", "x * torch.sigmoid(1.702 * x)"])
def test_quadrature_matches_an_independent_integral(spec):
    mean, variance, _ = _trapezoid(get_activation(spec))
    m = moments(spec)
    assert m.mean == pytest.approx(mean, abs=1e-8)
    assert gamma(spec) == pytest.approx(variance**-0.5, rel=1e-7)
    report = gamma_report(spec)
    if report.closed_form is not None:
        assert report.closed_form == pytest.approx(variance**-0.5, rel=1e-7)
    assert report.quadrature_error < 1e-9


# ---- the tabulated constants ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(TABLE_GAMMA) - {"identity"}))
def test_table_values_are_within_their_sampling_error(name):
    """The NFNets paper samples gamma as mean(var(g(x), axis=1)) ** -0.5 with x of shape (1024, 256): R = 1024 rows of
    n = 256 draws, population variance per row. A row's variance V has E[V] = s2 (n-1)/n and
    Var[V] = ((n-1)/n)^2 (mu4/n - s2^2 (n-3)/(n(n-1))); the mean of R rows has variance Var[V]/R; by the delta method
    gamma_hat has mean E[V]^-1/2 and sd gamma/2 sd/E[V]. DeepMind's "gelu" is JAX's tanh approximation."""
    fn = get_activation("gelu_tanh" if name == "gelu" else name)
    _, s2, mu4 = _trapezoid(fn)
    n, rows = 256, 1024
    expected_v = s2 * (n - 1) / n
    sd_v = math.sqrt(((n - 1) / n) ** 2 * (mu4 / n - s2 * s2 * (n - 3) / (n * (n - 1))) / rows)
    expected, sd = expected_v**-0.5, 0.5 * expected_v**-0.5 * sd_v / expected_v
    table = TABLE_GAMMA[name]
    assert abs(table - expected) < 3 * sd, (name, (table - expected) / sd)
    report = gamma_report("gelu_tanh" if name == "gelu" else name)
    assert report.table_value == table
    assert report.table_expected == pytest.approx(expected, rel=1e-7)
    assert report.table_std_error == pytest.approx(sd, rel=1e-5)
    assert report.table_difference == pytest.approx(table - s2**-0.5, abs=1e-7)


def test_the_table_is_a_sample_not_the_integral():
    """DeepMind's relu 1.7139588594436646 is 1.1e-3 above the exact 1.7128585: far beyond quadrature error."""
    report = gamma_report("relu")
    assert report.table_difference == pytest.approx(1.7139588594436646 - math.sqrt(2 / (1 - 1 / PI)), abs=1e-12)
    assert report.table_difference > 1e-3
    assert gamma_report("identity").table_std_error is None  # identity's 1.0 is exact, not sampled
    assert gamma_report("abs").table_value is None


# ---- spec forms -----------------------------------------------------------------------------------------------------
def test_function_names_resolve_to_torch():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    for spec in ("hardswish", "F.hardswish", "torch.nn.functional.hardswish"):
        assert torch.equal(get_activation(spec)(x), F.hardswish(x)), spec
        assert parse_activation(spec).name == "hardswish"
    assert parse_activation("torch.erf").name == parse_activation("erf").name == "erf"
    assert parse_activation("torch.special.expit").name == "sigmoid"
    assert gamma_report("torch.special.expit").table_value == TABLE_GAMMA["sigmoid"]
    assert parse_activation("x * torch.sigmoid(1.702 * x)").name is None  # expressions get no closed form or table
    # The same function reached two ways has the same constant; a scale divides gamma.
    assert gamma("F.gelu(x, approximate='tanh')") == gamma("gelu_tanh")
    assert gamma("math.sqrt(2) * F.relu(x)") == pytest.approx(gamma("relu") / math.sqrt(2), rel=1e-12)
    assert gamma("x + 1000") == pytest.approx(1.0, rel=1e-12)  # the mean does not leak into the variance


UNSAFE = [
    "__import__('os').system('touch PWNED')", "().__class__", "x.__class__", "lambda x: x", "(lambda: 0)()",
    "torch.load('f')", "torch.save(x, 'f')", "open('f')", "eval('1')", "getattr(torch, 'load')",
    "[x for x in (1,)]", "x[0]", "F.relu(x, inplace=True)", "torch.exp(x, out=x)", "torch.special.__dict__",
    "math.__loader__", "x if x else x", "torch", "'abc'", "x.exp()", "torch.nn.Module", "torch.manual_seed(0)",
    "F.dropout(x)", "x and x", "not x", "{x}", "x @ x", "True", "None", "b'x'", "f'{x}'", "(y := x)", "*x",
    "torch.where(x > 0, x, x, **{})", "F.relu(*[x])", "0 < x < 1", "math.pi", "relu(x)", "x = 1",
]


@pytest.mark.parametrize("spec", UNSAFE)
def test_unsafe_expressions_are_refused_in_one_line(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SppError) as err:
        gamma(spec)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing ran that could write a file


def test_pathological_expressions_fail_fast():
    """10**10**10 in integers would run for minutes; numbers are floats, so it overflows at once. Deep nesting
    and huge specs are refused before anything runs; a singularity stops the quadrature's bisection early."""
    for spec in ("10 ** 10 ** 10", "-" * 100_000 + "x", "-" * 500 + "x", "x" + " + x" * 400, "1 / x"):
        start = time.perf_counter()
        with pytest.raises(SppError):
            gamma(spec)
        assert time.perf_counter() - start < 2.0, spec


@pytest.mark.parametrize(("spec", "words"), [
    ("torch.log(x)", "not finite at x"),
    ("torch.exp(x * x / 4)", "does not converge"),
    ("1 / x", "did not converge"),
    ("0 * x", "constant"),
    ("x.sum()", "x.sum"),
    ("torch.where(x > 1, x, x)[:1]", "Subscript"),
    ("F.threshold(x)", "failed"),
    ("relu7", "unknown activation 'relu7' (did you mean: relu, rrelu, relu6?)"),
])
def test_specs_without_a_gamma_are_refused(spec, words):
    with pytest.raises(SppError) as err:
        gamma(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


# ---- the API the reference models use -----------------------------------------------------------------------------
def test_activation_module_and_models_accept_any_spec():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Activation("x * 2")(x), 2 * x) and Activation("relu").extra_repr() == "relu"
    model = create_model("nf_resnet50", width=0.0625, activation="hardswish")
    _, variance, _ = _trapezoid(F.hardswish)
    assert model.stages[0][0].conv1.gamma == pytest.approx(variance**-0.5, rel=1e-7)


def test_describe_gamma_keeps_order_and_formats_a_table():
    specs = ["relu", "torch.erf", "x * torch.sigmoid(1.702 * x)"]
    reports = describe_gamma(specs)
    assert [r.spec for r in reports] == specs
    assert [r.gamma for r in reports] == [gamma(s) for s in specs]
    text = format_gamma_table(reports)
    assert len(text.splitlines()) == 4 and "1.712859" in text and "+0.001100" in text
    d = reports[0].to_dict()
    assert d["gamma"] == reports[0].gamma and d["he_gain"] == pytest.approx(math.sqrt(2))

"""Signal propagation at init of the reference transformers, derived as a token-covariance (kernel) recursion.

The SPP reads a token stream per channel over all tokens (batch x positions) and averages over channels. With
random weights, those averages are functions of two L x L matrices (L = sequence length), averaged over channels:

    K[i, k]  = E_c[x_ic x_kc]    tokens i and k of the same sequence (the diagonal is the per-position RMS^2),
    Kx[i, k] = E_c[x_ic x'_kc]   token i of one sequence and token k of an independent one.

Over infinitely many sequences, ``sq`` (the per-channel squared mean) = mean(Kx) and ``var`` (the per-channel
variance) = mean(diag K) - mean(Kx). A finite batch of B sequences reads ``var - common / B`` and
``sq + common / B``, with ``common`` = mean(K) - mean(Kx) the part tokens of one sequence share (``TapTheory``
keeps it so tests can compare at their batch size).

The operations, at infinite width (each is exact in expectation over the weights; a finite width d adds
relative fluctuations of order 1/sqrt(d) per layer):

* N(0, 1/fan_in) linear maps keep K and Kx; a branch with independent weights is uncorrelated with the stream, so
  an addition adds the kernels.
* LayerNorm divides each token by its RMS: K -> K / sqrt(diag K diag K^T), Kx likewise (each token by its own
  RMS, diag K). Its output has unit diagonal.
* The MLP g(W1 u) with the activation's He gain c^2 = 1 / E[g(z)^2] on the second linear maps a unit-diagonal
  kernel entrywise: K -> c^2 F(K), F(rho) = E[g(z1) g(z2)] for standard normals of correlation rho (a table from
  Mehler's formula, ``activation_kernel``). F(0) = E[g]^2 > 0 for gelu: independent tokens leave the MLP with a
  shared mean, the per-channel mean that grows in the LN models. NF's Scaled WS rows have zero mean, which
  removes that constant: K -> gamma^2 (F(K) - E[g]^2), gamma = 1 / std(g(z)), unit diagonal in and out.
* Attention with a zero-initialised query projection (muP, Yang et al. 2021; GPT-2's N(0, 0.02) init gives logits of
  std about 0.3 at width 768, close to this) has logits 0: query i averages its n_i visible keys uniformly, o = C v
  with C[i, j] = 1 / (i + 1) for j <= i (causal; 1 / L everywhere otherwise). So K -> C K C^T, Kx -> C Kx C^T.
  On independent tokens the branch variance is mean_i 1 / (i + 1) = H_L / L (causal) or 1 / L; a component that
  is the same along a sequence (which attention itself creates) passes at gain 1, so the branch grows with depth as
  the stream's tokens become correlated: the recursion carries that, an i.i.d.-token formula does not (width 128,
  L = 64, Pre-LN: the 8th attention branch measures 0.21, the recursion says 0.21, (1 - p) H_L / L says 0.05).
* NF's shaped attention (He & Hofmann 2023) mixes with softmax(.) - C + I, which is I at init: K unchanged.

What the recursion leaves out, and why the tests allow a few per cent: finite width (per-layer fluctuations of the
weights' norms and of the random mean direction, relative size about sqrt(2 / d) for a single layer's mean),
token ids from a finite vocabulary (repeated tokens: off-diagonal corrections of order 1 / vocab_size), and the
LayerNorm's per-token centring and eps (order 1 / d and 1e-5). Measured (``examples/transformer_references.py``
and the tests): Pre-LN within 2% per tap at width 128 over 8 layers and within 7% at 48 layers; NF within 2%.
Post-LN deep in the stack is mostly a shared mean direction whose norm drifts with the weights and is only weakly
pulled back, so one model wanders around the line, and at finite width the line is approached from below:
48 layers, 32 tokens, the last variance is 17% below it at width 256 (4 seeds, spread 10%) and 8% below at
width 512 (2 seeds): a bias of order 1 / width, the recursion being the infinite-width limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from spp.models.activations import gaussian_moments, get_activation

RHO_POINTS = 2049  # table of F(rho) on [-1, 1], interpolated linearly (error below 1e-6 for smooth activations)


@dataclass(frozen=True)
class TapTheory:
    """Expected statistics at one tap over infinitely many sequences: the stream where the tap reads it
    (post-norm: the sum before the norm) and the branch before any scale."""

    layer: int  # 1-based layer number
    branch: str  # "attn" or "mlp"
    var: float  # per-channel variance of the stream
    sq: float  # per-channel squared mean of the stream
    common: float  # per-channel variance shared by the tokens of one sequence: a batch of B reads var - common/B
    branch_var: float
    branch_sq: float
    branch_common: float

    def at_batch(self, batch: int) -> tuple[float, float, float]:
        """(var, sq, branch_var) as a batch of ``batch`` sequences reads them (population variance, ddof 0)."""
        return (self.var - self.common / batch, self.sq + self.common / batch,
                self.branch_var - self.branch_common / batch)


@dataclass
class Kernel:
    """Same-sequence and cross-sequence token second moments, averaged over channels (float64, L x L)."""

    same: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def independent_tokens(cls, seq_len: int) -> Kernel:
        """Unit-variance, zero-mean, independent tokens: N(0, 1) embeddings, or uniformly random ids into a
        standardised table (column mean 0, so two independent tokens have E[e_a . e_b] = 0 exactly)."""
        eye = torch.eye(seq_len, dtype=torch.float64)
        return cls(eye, torch.zeros_like(eye))

    def __add__(self, other: Kernel) -> Kernel:
        return Kernel(self.same + other.same, self.cross + other.cross)

    def stats(self) -> tuple[float, float, float]:
        """(var, sq, common) over infinitely many sequences."""
        sq = float(self.cross.mean())
        return float(self.same.diagonal().mean()) - sq, sq, float(self.same.mean()) - sq

    def normalized(self) -> Kernel:
        """LayerNorm: every token divided by its RMS over channels."""
        rms = self.same.diagonal().sqrt()
        outer = rms[:, None] * rms[None, :]
        return Kernel(self.same / outer, self.cross / outer)

    def averaged(self, causal: bool) -> Kernel:
        """Uniform attention o = C x: C K C^T, by cumulative sums over each axis (causal) or the full mean."""
        if not causal:
            return Kernel(torch.full_like(self.same, float(self.same.mean())),
                          torch.full_like(self.cross, float(self.cross.mean())))
        count = torch.arange(1, self.same.shape[0] + 1, dtype=self.same.dtype)

        def both_sides(k: torch.Tensor) -> torch.Tensor:
            return (k.cumsum(0) / count[:, None]).cumsum(1) / count[None, :]

        return Kernel(both_sides(self.same), both_sides(self.cross))

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
        return Kernel(fn(self.same), fn(self.cross))


def uniform_attention(seq_len: int, causal: bool) -> torch.Tensor:
    """C: query i averages keys 0..i (causal) or all L keys, with equal weights (a reference for the tests;
    the recursion applies it with cumulative sums, O(L^2) instead of a matrix product)."""
    if causal:
        return torch.tril(torch.ones(seq_len, seq_len, dtype=torch.float64)) / torch.arange(
            1, seq_len + 1, dtype=torch.float64)[:, None]
    return torch.full((seq_len, seq_len), 1.0 / seq_len, dtype=torch.float64)


MEHLER_TERMS = 200
MEHLER_POINTS = 40_001


@cache
def activation_kernel(activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, F(rho)) on [-1, 1]: F(rho) = E[g(z1) g(z2)] for standard normals of correlation rho.

    Mehler's formula: F(rho) = sum_n c_n^2 rho^n with c_n = E[g(z) He_n(z)] / sqrt(n!) (normalised Hermite
    coefficients, by the trapezoid rule on [-12, 12]), 200 terms, plus the rest of F(1) = E[g^2] as a rho^200
    term so that F(1) is exact. Checked against relu's closed form (the arc-cosine kernel): error below 5e-5.
    """
    fn = get_activation(activation)
    z = torch.linspace(-12.0, 12.0, MEHLER_POINTS, dtype=torch.float64)
    weighted = fn(z) * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    prev, cur = torch.ones_like(z), z.clone()
    coefs = [torch.trapezoid(weighted * prev, z), torch.trapezoid(weighted * cur, z)]
    for n in range(1, MEHLER_TERMS - 1):
        prev, cur = cur, (z * cur - math.sqrt(n) * prev) / math.sqrt(n + 1)
        coefs.append(torch.trapezoid(weighted * cur, z))
    c2 = torch.stack(coefs) ** 2
    rest = gaussian_moments(activation)[1] - float(c2.sum())
    rho = torch.linspace(-1.0, 1.0, RHO_POINTS, dtype=torch.float64)
    powers = rho[:, None] ** torch.arange(MEHLER_TERMS, dtype=torch.float64)[None, :]
    return rho, powers @ c2 + rest * rho**MEHLER_TERMS


def _interp(table: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    rho, values = table
    k = k.clamp(-1.0, 1.0)
    pos = (k + 1.0) * ((len(rho) - 1) / 2.0)
    lo = pos.floor().clamp(max=len(rho) - 2).long()
    frac = pos - lo
    return values[lo] * (1 - frac) + values[lo + 1] * frac


def mlp_map(activation: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LN models' MLP on a unit-diagonal kernel: c^2 F(K), c the He gain of the second linear."""
    table = activation_kernel(activation)
    m2 = gaussian_moments(activation)[1]
    return lambda k: _interp(table, k) / m2


def _record(out: list[TapTheory], layer: int, branch: str, stream: Kernel, part: Kernel) -> None:
    var, sq, common = stream.stats()
    bvar, bsq, bcommon = part.stats()
    out.append(TapTheory(layer, branch, var, sq, common, bvar, bsq, bcommon))


def preln_theory(depth: int, *, seq_len: int, causal: bool, activation: str) -> list[TapTheory]:
    """x + attn(LN(x)), then + mlp(LN(.)): every branch sees unit-RMS tokens, so each adds a bounded variance and the
    stream grows linearly with depth, its mean share (gelu's mean through the MLPs, passed by attention at gain 1)
    and its within-sequence correlation settling as it grows."""
    mlp = mlp_map(activation)
    x = Kernel.independent_tokens(seq_len)
    out: list[TapTheory] = []
    for layer in range(1, depth + 1):
        part = x.normalized().averaged(causal)
        x = x + part
        _record(out, layer, "attn", x, part)
        part = x.normalized().mapped(mlp)
        x = x + part
        _record(out, layer, "mlp", x, part)
    return out


def postln_theory(depth: int, *, seq_len: int, causal: bool, activation: str) -> list[TapTheory]:
    """LN(x + attn(x)), then LN(. + mlp(.)): the norm resets the stream after every branch, so the pre-norm sum
    stays at its first layers' level: flat."""
    mlp = mlp_map(activation)
    x = Kernel.independent_tokens(seq_len)
    out: list[TapTheory] = []
    for layer in range(1, depth + 1):
        part = x.averaged(causal)
        total = x + part
        _record(out, layer, "attn", total, part)
        x = total.normalized()
        part = x.mapped(mlp)
        total = x + part
        _record(out, layer, "mlp", total, part)
        x = total.normalized()
    return out


def nf_theory(depth: int, *, seq_len: int, alpha: float) -> list[TapTheory]:
    """x + alpha f(x / beta) with variance-preserving, mean-free branches that do not mix positions at init
    (Scaled WS, gamma, shaped attention = I): tokens stay independent and Var grows by alpha^2 per branch,
    1 + k alpha^2 after the k-th branch (one stage: no reset). K stays diagonal, so a token shares 1 / L of
    its sequence's variance (``common``)."""
    out = []
    for k in range(1, 2 * depth + 1):
        var = 1.0 + k * alpha**2
        out.append(TapTheory((k + 1) // 2, "attn" if k % 2 else "mlp", var, 0.0, var / seq_len,
                             1.0, 0.0, 1.0 / seq_len))
    return out

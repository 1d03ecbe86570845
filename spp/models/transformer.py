"""Reference transformers for token models: Pre-LN, Post-LN and normaliser-free, with their SPP at init derived.

The transformer analogue of the paper's Figure 1 (Brock, De, Smith 2021): the same stack of layers, each an
attention branch and an MLP branch on a residual stream, with the normalisation in three places.

* **Pre-LN** (GPT-2): ``x + attn(LN(x))``, then ``+ mlp(LN(.))``. Each branch sees a unit-RMS input, so each adds
  a depth-independent variance and the stream grows linearly with depth (the BN-ReLU-Conv ResNet's picture).
* **Post-LN** (the original transformer, BERT): ``LN(x + attn(x))``, then ``LN(. + mlp(.))``. The norm resets the
  stream after every branch, so the pre-norm sum is flat over depth; the SPP reads that sum (the norm's input).
* **NF** (normaliser-free, the NF-ResNet recipe): ``x + alpha * attn(x / beta)``, then the same for the MLP, with
  beta = sqrt(expected Var(x)) and the expected variance growing by alpha^2 per branch (1 + k alpha^2 after the
  k-th, one stage, no reset). Both branches are variance-preserving and mean-free at init: every linear layer uses
  Scaled WS (zero-mean rows of unit norm), the activation is scaled by gamma = 1 / std(g(z)) (folded into the
  second MLP linear, as NF-ResNets fold it into the next conv), and attention is shaped (He & Hofmann 2023):
  softmax(q k^T / sqrt(d_h)) - C + I, C the uniform average over the visible keys. Why: a softmax average of n
  independent values keeps 1/n of their variance (H_L / L over a causal sequence, 0.04 at L = 128) but passes a
  component shared along the sequence at gain 1; no constant gain fixes both (a gain that restores the first
  multiplies the second, layer after layer), and the only row-stochastic causal mixing that keeps independent unit
  tokens independent and unit is I. With a zero query (the WS gain of q starts at 0) softmax = C, so the mixing is
  exactly I at init and becomes attention as q learns.

Shared choices: the query projection is zero at init (muP, Yang et al. 2021), so every query averages its visible
keys uniformly and the theory is exact linear algebra over positions (GPT-2's N(0, 0.02) init gives logits of std
about 0.3 at width 768, nearly the same); no biases in the LN models' linears (NF's Scaled WS linears carry a
zero-init bias), no dropout, no positional embedding (the stem is the token embedding itself; causal masking alone
breaks the symmetry), fan-in init N(0, 1/fan_in) for every other linear of the LN models except the MLP's second,
which has the activation's He gain (1 / sqrt(E[g(z)^2]), 1.534 for gelu) like the ResNet references' convs.
LayerNorm: weight 1, bias 0, eps 1e-5. The last layer is followed by a final norm (Pre-LN), nothing (Post-LN) or
x / sqrt(expected Var) (NF), and a linear head to the vocabulary.

Input: token ids (batch, seq) through the model's own embedding table, or float embeddings (batch, seq, width)
directly (the analogue of a Gaussian image). The table is drawn N(0, 1) and each channel standardised over the
vocabulary (mean 0, population variance 1 exactly), so uniformly random token ids give a stem of unit variance and
no mean, as N(0, 1) embeddings do: ``spp_stem_expected_var`` = 1. A model is built for one sequence length: the LN
models' theory depends on it (attention averages over it), so another length is refused rather than drawn wrongly.

Theory per tap (``spp_theory``, and ``expected_var`` on each tap): ``spp.models.transformer_theory``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from spp.errors import SppError
from spp.models.activations import Activation, gamma, get_activation, second_moment_gain
from spp.models.layers import ScaledStdLinear, he_linear
from spp.models.transformer_theory import TapTheory, nf_theory, postln_theory, preln_theory
from spp.taps import Site, Tap

Linear = Callable[[int, int], nn.Module]
POST_NORM_STREAM = "LayerNorm input (post-norm: the sum before the norm)"


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections from ``linear``; the query projection is zero at init
    (``zero_query``), so every query averages its visible keys uniformly.

    ``shaped``: the mixing matrix is softmax(q k^T / sqrt(d_h)) - C + I (He & Hofmann 2023), C the uniform average
    over the visible keys: I at init, so the branch does not average positions away; NF's choice.
    """

    def __init__(self, width: int, heads: int, *, causal: bool, linear: Linear, zero_query: Callable[[nn.Module], None],
                 shaped: bool = False) -> None:
        super().__init__()
        self.heads, self.causal, self.shaped = heads, causal, shaped
        self.q, self.k, self.v = linear(width, width), linear(width, width), linear(width, width)
        self.proj = linear(width, width)
        zero_query(self.q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2)

        v = split(self.v(x))
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), v, is_causal=self.causal)
        if self.shaped:
            if self.causal:
                count = torch.arange(1, seq + 1, device=v.device, dtype=v.dtype)[:, None]
                uniform = v.cumsum(dim=2) / count
            else:
                uniform = v.mean(dim=2, keepdim=True)
            out = out - uniform + v
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, causal={self.causal}, shaped={self.shaped}"


def _zero_weight(linear: nn.Module) -> None:
    nn.init.zeros_(cast(torch.Tensor, linear.weight))


def _zero_gain(linear: nn.Module) -> None:
    nn.init.zeros_(cast(torch.Tensor, linear.gain))


class MLP(nn.Module):
    """fc2(act(fc1(x))): the activation is a module so it shows in ``named_modules``."""

    def __init__(self, fc1: nn.Module, activation: str, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, Activation(activation), fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Scale(nn.Module):
    """x * factor: NF's division by beta, a module so its input (the stream) can be hooked."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.4f}"


def _tap(name: str, branch: str, output: Site, shortcut: Site, expected: dict[str, float], stream: str = "") -> Tap:
    return Tap(name=f"{name}.{branch}", module=name, stage=-1, output=output, residual=Site(f"{name}.{branch}"),
               rule="spp", channel_dim=-1, shortcut=shortcut, branch=branch, stream=stream,
               expected_var=expected.get(branch))


class PreLNLayer(nn.Module):
    """h = x + attn(ln1(x)); return h + mlp(ln2(h)). The stream after the attention add is ln2's input."""

    def __init__(self, width: int, attn: SelfAttention, mlp: MLP) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(width), attn, nn.LayerNorm(width), mlp
        self.spp_expected_var: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def spp_taps(self, name: str) -> list[Tap]:
        ev = self.spp_expected_var
        return [_tap(name, "attn", Site(f"{name}.ln2", "input"), Site(f"{name}.ln1", "input"), ev),
                _tap(name, "mlp", Site(name), Site(f"{name}.ln2", "input"), ev)]


class PostLNLayer(nn.Module):
    """h = ln1(x + attn(x)); return ln2(h + mlp(h)). The SPP reads each sum at its norm's input."""

    def __init__(self, width: int, attn: SelfAttention, mlp: MLP) -> None:
        super().__init__()
        self.attn, self.ln1, self.mlp, self.ln2 = attn, nn.LayerNorm(width), mlp, nn.LayerNorm(width)
        self.spp_expected_var: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))

    def spp_taps(self, name: str) -> list[Tap]:
        ev = self.spp_expected_var
        return [_tap(name, "attn", Site(f"{name}.ln1", "input"), Site(name, "input"), ev, POST_NORM_STREAM),
                _tap(name, "mlp", Site(f"{name}.ln2", "input"), Site(f"{name}.ln1"), ev, POST_NORM_STREAM)]


class NFLayer(nn.Module):
    """h = x + alpha * attn(x / beta_attn); return h + alpha * mlp(h / beta_mlp). The branch taps read before
    alpha; the stream after the attention add is scale2's input."""

    def __init__(self, attn: SelfAttention, mlp: MLP, *, alpha: float, beta_attn: float, beta_mlp: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.scale1, self.attn = Scale(1.0 / beta_attn), attn
        self.scale2, self.mlp = Scale(1.0 / beta_mlp), mlp
        self.spp_expected_var: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha * self.attn(self.scale1(x))
        return x + self.alpha * self.mlp(self.scale2(x))

    def spp_taps(self, name: str) -> list[Tap]:
        ev = self.spp_expected_var
        return [_tap(name, "attn", Site(f"{name}.scale2", "input"), Site(f"{name}.scale1", "input"), ev),
                _tap(name, "mlp", Site(name), Site(f"{name}.scale2", "input"), ev)]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


Layer = PreLNLayer | PostLNLayer | NFLayer


class ReferenceTransformer(nn.Module):
    """Embedding (or float embeddings passed in), ``blocks`` (one stage of layers), ``final``, ``head``."""

    def __init__(self, family: str, layers: Sequence[Layer], *, width: int, vocab_size: int, seq_len: int,
                 final: nn.Module, head: nn.Module, theory: list[TapTheory]) -> None:
        super().__init__()
        self.family, self.width, self.vocab_size, self.seq_len = family, width, vocab_size, seq_len
        self.embed = nn.Embedding(vocab_size, width)
        with torch.no_grad():
            table = self.embed.weight.normal_()
            table.sub_(table.mean(dim=0)).div_(table.std(dim=0, unbiased=False))
        self.blocks = nn.Sequential(*layers)
        self.final, self.head = final, head
        self.spp_stem_expected_var = 1.0
        self.spp_theory = theory
        for i, layer in enumerate(layers, start=1):
            layer.spp_expected_var = {t.branch: t.var for t in theory if t.layer == i}

    def forward(self, x: torch.Tensor | None = None, *, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (batch, seq) or embeddings (batch, seq, width), positionally or by HuggingFace's keyword names
        (``input_ids=``, ``inputs_embeds=``: spp's token and embedding inputs feed every token model alike)."""
        given = [t for t in (x, input_ids, inputs_embeds) if t is not None]
        if len(given) != 1:
            raise SppError(f"{self.family} takes one input: token ids or embeddings, got {len(given)}")
        x = given[0]
        if x.is_floating_point():
            if x.ndim != 3 or x.shape[-1] != self.width:
                raise SppError(f"{self.family} takes token ids (batch, seq) or embeddings (batch, seq, {self.width}),"
                               f" not a float tensor of shape {tuple(x.shape)}; build it with width=D to match")
        else:
            if x.ndim != 2:
                raise SppError(f"{self.family} takes token ids of shape (batch, seq), not {tuple(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
                raise SppError(f"token ids must lie in [0, {self.vocab_size}), got [{int(x.min())}, {int(x.max())}];"
                               " build the model with a larger vocab_size")
            x = self.embed(x)
        if x.shape[1] != self.seq_len:
            raise SppError(f"{self.family} was built for sequence length {self.seq_len} (its theory assumes it), "
                           f"got {x.shape[1]}; build it with seq_len={x.shape[1]}")
        return self.head(self.final(self.blocks(x)))

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, seq_len={self.seq_len}"


def _check(depth: int | Sequence[int], width: int, heads: int, mlp_ratio: float, vocab_size: int, seq_len: int,
           activation: str) -> tuple[int, int]:
    """The number of layers and the MLP width, after checking the options."""
    layers = int(depth) if isinstance(depth, int) else int(sum(depth))
    get_activation(activation)
    if layers < 1 or width < 1 or heads < 1 or width % heads:
        raise SppError(f"need depth >= 1 and a width divisible by heads, got depth {layers}, width {width}, "
                       f"heads {heads}")
    if vocab_size < 2 or seq_len < 1 or mlp_ratio <= 0:
        raise SppError(f"need vocab_size >= 2, seq_len >= 1 and mlp_ratio > 0, got {vocab_size}, {seq_len}, "
                       f"{mlp_ratio}")
    return layers, max(1, round(width * mlp_ratio))


def _ln_transformer(family: str, layer_cls: type[PreLNLayer | PostLNLayer], theory_fn: Callable[..., list[TapTheory]],
                    depth: int | Sequence[int], *, width: int, heads: int, mlp_ratio: float, activation: str,
                    causal: bool, vocab_size: int, seq_len: int) -> ReferenceTransformer:
    layers, hidden = _check(depth, width, heads, mlp_ratio, vocab_size, seq_len, activation)
    blocks: list[Layer] = []
    for _ in range(layers):
        attn = SelfAttention(width, heads, causal=causal, linear=he_linear, zero_query=_zero_weight)
        mlp = MLP(he_linear(width, hidden), activation, he_linear(hidden, width, second_moment_gain(activation)))
        blocks.append(layer_cls(width, attn, mlp))
    theory = theory_fn(layers, seq_len=seq_len, causal=causal, activation=activation)
    final = nn.LayerNorm(width) if layer_cls is PreLNLayer else nn.Identity()
    return ReferenceTransformer(family, blocks, width=width, vocab_size=vocab_size, seq_len=seq_len, final=final,
                                head=he_linear(width, vocab_size), theory=theory)


def preln_transformer(depth: int | Sequence[int], *, width: int = 256, heads: int = 4, mlp_ratio: float = 4.0,
                      activation: str = "gelu", causal: bool = True, vocab_size: int = 256,
                      seq_len: int = 128) -> ReferenceTransformer:
    """A Pre-LN (GPT-2 style) transformer of ``depth`` layers; theory: ``transformer_theory.preln_theory``."""
    return _ln_transformer("preln_transformer", PreLNLayer, preln_theory, depth, width=width, heads=heads,
                           mlp_ratio=mlp_ratio, activation=activation, causal=causal, vocab_size=vocab_size,
                           seq_len=seq_len)


def postln_transformer(depth: int | Sequence[int], *, width: int = 256, heads: int = 4, mlp_ratio: float = 4.0,
                       activation: str = "gelu", causal: bool = True, vocab_size: int = 256,
                       seq_len: int = 128) -> ReferenceTransformer:
    """A Post-LN transformer of ``depth`` layers; theory: ``transformer_theory.postln_theory``."""
    return _ln_transformer("postln_transformer", PostLNLayer, postln_theory, depth, width=width, heads=heads,
                           mlp_ratio=mlp_ratio, activation=activation, causal=causal, vocab_size=vocab_size,
                           seq_len=seq_len)


def nf_transformer(depth: int | Sequence[int], *, width: int = 256, heads: int = 4, mlp_ratio: float = 4.0,
                   activation: str = "gelu", causal: bool = True, vocab_size: int = 256, seq_len: int = 128,
                   alpha: float = 0.2) -> ReferenceTransformer:
    """A normaliser-free transformer of ``depth`` layers with Scaled WS, alpha/beta bookkeeping and a
    variance-preserving attention constant; expected variance 1 + k alpha^2 after the k-th branch."""
    layers, hidden = _check(depth, width, heads, mlp_ratio, vocab_size, seq_len, activation)
    blocks: list[Layer] = []
    for i in range(layers):
        attn = SelfAttention(width, heads, causal=causal, linear=ScaledStdLinear, zero_query=_zero_gain, shaped=True)
        mlp = MLP(ScaledStdLinear(width, hidden), activation, ScaledStdLinear(hidden, width, gamma=gamma(activation)))
        beta_attn = math.sqrt(1.0 + 2 * i * alpha**2)
        beta_mlp = math.sqrt(1.0 + (2 * i + 1) * alpha**2)
        blocks.append(NFLayer(attn, mlp, alpha=alpha, beta_attn=beta_attn, beta_mlp=beta_mlp))
    final = Scale(1.0 / math.sqrt(1.0 + 2 * layers * alpha**2))
    return ReferenceTransformer("nf_transformer", blocks, width=width, vocab_size=vocab_size, seq_len=seq_len,
                                final=final, head=ScaledStdLinear(width, vocab_size),
                                theory=nf_theory(layers, seq_len=seq_len, alpha=alpha))


def transformer_taps(model: nn.Module) -> list[Tap]:
    """The stem and every layer's ``spp_taps``, in one stage: what spp's native rule gives these models.

    For use with ``spp.hooks.record(model, x, taps=transformer_taps(model))`` until discovery calls ``spp_taps``.
    """
    found = [(name, m) for name, m in model.named_modules() if callable(getattr(type(m), "spp_taps", None))]
    if not found:
        raise SppError(f"{type(model).__name__} has no layer with spp_taps")
    first = found[0][0]
    stem = Tap(name="stem", module=first, stage=0, output=Site(first, "input"), residual=None,
               rule="input of the first block", channel_dim=-1,
               expected_var=getattr(model, "spp_stem_expected_var", None), layer=0)
    taps = [stem]
    for i, (name, layer) in enumerate(found, start=1):
        taps += [replace(t, stage=1, layer=i) for t in layer.spp_taps(name)]
    return taps

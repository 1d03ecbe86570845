"""The loss a gradient (backward) SPP back-propagates, and the graph plumbing its backward pass needs.

``--grad`` records, per tap, the statistics of dL/d(stream tensor) and dL/d(branch before its scale) for one loss
L per micro-batch. Which loss (``--loss``, ``spp.hooks.record(loss=...)``):

* ``random`` (default): L = sum(output * g), g ~ N(0, 1) elementwise. dL/d(output) = g: a white, unit-variance
  gradient enters the network whatever the output's scale or meaning, the backward analogue of the forward's
  Gaussian input. g for micro-batch j is drawn on the CPU from a generator seeded with (seed, j), the scheme of the
  Gaussian inputs (``spp.inputs``), so the same run gives the same g on any device and any number of ranks.
* ``xent``: cross-entropy of a classifier's logits (batch, classes) against labels drawn uniformly from the
  classes with (seed, j): dL/d(logits) = softmax - one-hot, the gradient a classifier gets at the start of training.
* a callable ``loss(output) -> scalar tensor`` (library only): anything; it gets the model's raw output.

Both built-in losses are sums over the micro-batch, never means: a sample's gradient then does not depend on how
the samples are split into micro-batches, and micro-batches merge exactly (where the model has no batch-dependent
layer) as the forward statistics do. The loss reads one tensor of the model's output: the output itself, else
``last_hidden_state`` (``logits`` for ``xent``) of a ModelOutput / dict, else its first floating-point tensor
(nested tuples, lists and dicts searched in order); the record's settings say which (``grad_output``).

The backward pass (``backward_to``) computes the gradient at every hooked site and nothing else: it asks autograd
for the gradients of the sites no other site lies upstream of (``graph_roots``), so every site's tensor hook fires
on the way and no parameter's ``.grad`` is computed, let alone accumulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spp.errors import SppError
from spp.validate import LOSSES, check_loss

__all__ = ["LOSSES", "BuiltinLoss", "check_loss", "make_loss", "select_output"]

LossFn = Callable[[Any], torch.Tensor]


def _generator(seed: int, index: int) -> torch.Generator:
    """The generator of micro-batch ``index``: the same (seed, j) scheme as the Gaussian inputs."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**64)


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def select_output(output: Any, prefer: Sequence[str] = ("last_hidden_state", "logits")) -> tuple[torch.Tensor, str]:
    """The tensor of a model's ``output`` a built-in loss reads, and where it was found ("output",
    "output['last_hidden_state']", "output[0]", ...): the output itself when it is a floating tensor; of a mapping
    (a HuggingFace ModelOutput is one) the first key of ``prefer`` it has, else its first floating tensor; of a
    tuple or list its first floating tensor; nested containers are searched depth first, in order."""
    if _floating(output):
        return output, "output"
    if isinstance(output, Mapping):
        for key in prefer:
            if _floating(output.get(key)):
                return output[key], f"output[{key!r}]"
    found = _first_floating(output, "output", depth=0)
    if found is None:
        raise SppError(f"the model's output ({type(output).__name__}) holds no floating-point tensor to "
                       "back-propagate from; pass loss=a function of the output returning a scalar")
    return found


def _first_floating(value: Any, path: str, depth: int) -> tuple[torch.Tensor, str] | None:
    if _floating(value):
        return value, path
    if depth > 8:
        return None
    items: Iterator[tuple[str, Any]]
    if isinstance(value, Mapping):
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, v in items:
        found = _first_floating(v, where, depth + 1)
        if found is not None:
            return found
    return None


@dataclass
class BuiltinLoss:
    """A built-in loss (``random`` or ``xent``) of ``seed``; ``where`` is the output tensor it last read."""

    name: str
    seed: int = 0
    where: str = ""

    def __call__(self, output: Any, index: int) -> torch.Tensor:
        """The loss of micro-batch ``index`` (its number in the whole run, for the (seed, j) draw)."""
        if self.name == "xent":
            return self._xent(output, index)
        out, self.where = select_output(output)
        # float64 outputs keep float64; anything narrower is projected in float32 (g is N(0, 1) either way)
        dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
        g = torch.randn(tuple(out.shape), generator=_generator(self.seed, index), dtype=dtype)
        return torch.sum(out.to(dtype) * g.to(out.device))

    def _xent(self, output: Any, index: int) -> torch.Tensor:
        out, self.where = select_output(output, prefer=("logits", "last_hidden_state"))
        if out.ndim != 2 or out.shape[1] < 2:
            raise SppError(f"--loss xent needs a classifier's output of shape (batch, classes); the model's "
                           f"{self.where} has shape {tuple(out.shape)}: use --loss random")
        labels = torch.randint(0, int(out.shape[1]), (int(out.shape[0]),), generator=_generator(self.seed, index))
        return nn.functional.cross_entropy(out.float(), labels.to(out.device), reduction="sum")


def make_loss(loss: str | LossFn, seed: int) -> tuple[Callable[[Any, int], torch.Tensor], dict[str, Any]]:
    """``(loss_of(output, batch_index), settings)`` for ``loss``: a built-in name or the user's callable."""
    check_loss(loss)
    if isinstance(loss, str):
        builtin = BuiltinLoss(loss, seed)
        return builtin, {"loss": loss, "loss_seed": seed}
    user: LossFn = loss
    name = getattr(user, "__qualname__", None) or type(user).__name__

    def call(output: Any, index: int) -> torch.Tensor:
        return user(output)

    return call, {"loss": f"callable {name}"}


def check_scalar(value: Any, where: str) -> torch.Tensor:
    """The loss as a scalar that can be back-propagated, or one line saying why not."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise SppError(f"the loss must be a floating-point scalar tensor, not {shape}")
    if not value.requires_grad:
        raise SppError(f"the loss does not depend on anything the model computed with gradients ({where}); "
                       "is the model's output a constant?")
    return value.reshape(())


# ---- the forward with a graph -----------------------------------------------------------------------------------
@contextlib.contextmanager
def trainable(model: nn.Module) -> Iterator[None]:
    """Every floating-point parameter requires grad for the duration (frozen ones too, so that every site
    computed from them is in the graph), and gets its flag back after. No ``.grad`` is computed: the backward asks
    for the sites' gradients only."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def with_graph(batch: Any) -> Any:
    """``batch`` with each floating tensor replaced by a copy computed from a leaf that requires grad, so sites
    computed from the inputs alone are in the graph too. A copy, not the leaf itself: a model that adds into its
    input in place (``x += f(x)``) may do so to a copy, never to a leaf; and the caller's tensors stay untouched.
    (Inference-mode tensors could not be saved for backward either.)"""
    if isinstance(batch, torch.Tensor):
        if not batch.is_floating_point():
            return batch
        leaf = batch.detach() if not batch.is_inference() else batch.clone()
        return leaf.requires_grad_(True).clone()
    if isinstance(batch, Mapping):
        return {k: with_graph(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(with_graph(v) for v in batch) if isinstance(batch, list) else tuple(
            with_graph(v) for v in batch)
    return batch


def graph_walk(loss: torch.Tensor, edges: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(roots, unreachable): indices into ``edges`` (autograd GradientEdges of the hooked sites) of the sites the
    loss depends on with no other site upstream of them, and of the sites the loss does not depend on at all.

    Asking autograd for the gradients of the roots alone runs the backward through every other site the loss
    depends on (each lies between the loss and a root), so every such site's hook fires and only the roots'
    gradients are handed back. The loss does not depend on an unreachable site: its gradient is exactly zero.
    One walk over the graph below the loss (iterative: a 600-block model's graph is deeper than Python's stack).
    """
    site_nodes = {id(e.node) for e in edges}
    below: dict[int, bool] = {}  # id(node) -> some site's node lies strictly upstream of it; keys: every node seen
    start = loss.grad_fn
    stack: list[tuple[Any, bool]] = [(start, False)] if start is not None else []
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if key in below and not expanded:
            continue
        children = [n for n, _ in getattr(node, "next_functions", ()) if n is not None]
        if expanded:
            below[key] = any(id(c) in site_nodes or below.get(id(c), False) for c in children)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in below)
    roots = [k for k, e in enumerate(edges) if id(e.node) in below and not below[id(e.node)]]
    unreachable = [k for k, e in enumerate(edges) if id(e.node) not in below]
    return roots, unreachable


def distinct_edges(edges: Sequence[Any]) -> list[Any]:
    """``edges`` without repeats (a tensor read at two sites is one place in the graph)."""
    unique: dict[tuple[int, int], Any] = {}
    for e in edges:
        unique.setdefault((id(e.node), int(e.output_nr)), e)
    return list(unique.values())


def backward_to(loss: torch.Tensor, roots: Sequence[Any]) -> None:
    """Back-propagate ``loss`` to the ``roots`` (``graph_walk``): every site in between sees its gradient in its
    hook; the roots' gradients are dropped at once, and no parameter's ``.grad`` is computed."""
    if roots:
        torch.autograd.grad(loss, inputs=list(roots), allow_unused=True)

"""Which layer produced, and which layer first consumed, each tensor of one forward pass.

During the first forward of a recording, hooks on every leaf module note the tensor each one returns and the
tensor each one takes first. A tap's site tensor is then traced back to the layer that made it (through
pass-through layers: activations, dropout, pooling) to prove its channel axis (``spp.axes``). Tensors are held
by weak reference only: nothing a forward frees is kept alive, and a dead entry simply proves nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from spp.axes import PASS_THROUGH, Evidence, layer_evidence


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _ref(t: torch.Tensor) -> weakref.ReferenceType[torch.Tensor] | None:
    try:
        return weakref.ref(t)
    except TypeError:
        return None


class Provenance:
    """Hooks on the leaves of ``model`` for one forward; ``evidence_of`` / ``consumer_evidence`` read them."""

    def __init__(self, model: nn.Module) -> None:
        self._names = {m: n for n, m in model.named_modules()}
        # id(tensor) -> (the tensor, weakly; what the leaf that returned it says of its axis, or None). Resolved
        # when the leaf returns (a pass-through leaf takes its input's evidence then, while the input is alive).
        self._made: dict[int, tuple[Any, Evidence | None]] = {}
        # id(tensor) -> (the tensor, what the first leaf that took it as its first input and says something of its
        # axis says); pass-through leaves (activations, identity, dropout) hand the question on to their output's
        # consumer: id(their output) -> their input
        self._taken: dict[int, tuple[Any, Evidence]] = {}
        self._through: dict[int, tuple[Any, Any]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for module in model.modules():
            # Leaves, and layers that say something themselves though they hold children (timm's BatchNormAct2d
            # keeps its activation as a child): the layer that computed a tensor is one of them.
            if next(module.children(), None) is None or layer_evidence(module, "output") is not None:
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._made.clear()
        self._taken.clear()
        self._through.clear()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args) if args else _first_tensor(tuple(kwargs.values()))
        if x is None:
            return
        found = layer_evidence(module, "input", self._names.get(module, ""))
        if not isinstance(found, Evidence):
            return
        for _ in range(32):  # this tensor, and the tensors pass-through layers made it from
            entry = self._taken.get(id(x))
            if (entry is not None and entry[0]() is x) or (ref := _ref(x)) is None:
                return
            self._taken[id(x)] = (ref, found)
            back = self._through.get(id(x))
            if back is None or back[0]() is not x or (x := back[1]()) is None:
                return

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        out = _first_tensor(output)
        if out is None or (ref := _ref(out)) is None:
            return
        previous = self._made.get(id(out))
        if previous is not None and previous[0]() is out and previous[1] is not None:
            return  # an identity-like layer returned a tensor an earlier layer made: keep the maker's word
        found = layer_evidence(module, "output", self._names.get(module, ""))
        if found == PASS_THROUGH:
            inp = _first_tensor(args) if args else _first_tensor(tuple(kwargs.values()))
            # pooling keeps the rank and the channel axis; anything else proves nothing
            found = self.evidence_of(inp) if inp is not None and inp.ndim == out.ndim else None
            if inp is not None and inp is not out and inp.shape == out.shape and (back := _ref(inp)) is not None:
                self._through[id(out)] = (ref, back)
        if isinstance(found, Evidence) or previous is None or previous[0]() is not out:
            self._made[id(out)] = (ref, found if isinstance(found, Evidence) else None)

    def evidence_of(self, x: torch.Tensor) -> Evidence | None:
        """What the layer that returned ``x`` (followed back through pass-through layers) says of its axis."""
        entry = self._made.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        return entry[1]

    def consumer_evidence(self, x: torch.Tensor) -> Evidence | None:
        """What the first leaf that took ``x`` (or what pass-through layers made of it) as its first input says."""
        entry = self._taken.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        return entry[1]

    def leaf_evidence(self, module: nn.Module, role: str) -> Evidence | None:
        """What ``module`` itself says, when it is a leaf (a site read at a layer's input or output)."""
        if next(module.children(), None) is not None:
            return None
        found = layer_evidence(module, "input" if role == "input" else "output", self._names.get(module, ""))
        return found if isinstance(found, Evidence) else None

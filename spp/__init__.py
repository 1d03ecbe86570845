"""spp: Signal Propagation Plots for PyTorch (Brock, De, Smith 2021).

``import spp`` is light: torch, pandas and matplotlib load only when a function that needs them is used.
Submodules load on first attribute access (``spp.hooks``, ``spp.render``, ...), ``spp.load_record`` with
``spp.io``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

from spp.errors import SppError
from spp.record import Record

_SUBMODULES = ("commands", "compare", "discovery", "hooks", "inputs", "io", "loading", "models", "moments",
               "outputs", "record", "references", "render", "run", "taps")  # for dir(); any submodule loads
_LAZY = {"load_record": "spp.io"}

__all__ = ["Record", "SppError", "__version__", "load_record"]


def __getattr__(name: str) -> Any:
    """Import a submodule or a lazy function on first use, so ``import spp`` costs nothing heavy."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"spp.{name}") is not None:
        return importlib.import_module(f"spp.{name}")
    raise AttributeError(f"module 'spp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})

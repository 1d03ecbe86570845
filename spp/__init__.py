"""spp: Signal Propagation Plots for PyTorch (Brock, De, Smith 2021).

    import spp
    rec = spp.record(model, torch.randn(8, 3, 224, 224))   # the SPP statistics of every residual block
    rec.to_frame()                                          # a DataFrame, one row per tap point
    spp.plot(rec, references="auto")                       # three panels beside the reference ResNets
    spp.check(rec)                                          # verdicts in words

``import spp`` is light: torch, pandas and matplotlib load only when a function that needs them is first used.
Submodules are imported as usual (``import spp.hooks``); this namespace holds the public API only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first use
_API: dict[str, tuple[str, str]] = {
    "record": ("spp.hooks", "record"),
    "SignalRecorder": ("spp.hooks", "SignalRecorder"),
    "find_taps": ("spp.discovery", "find_taps"),
    "Rule": ("spp.discovery", "Rule"),
    "DEFAULT_RULES": ("spp.discovery", "DEFAULT_RULES"),
    "Tap": ("spp.taps", "Tap"),
    "Site": ("spp.taps", "Site"),
    "Record": ("spp.records", "Record"),
    "load_record": ("spp.files", "load_record"),
    "save_record": ("spp.files", "save_record"),
    "plot": ("spp.plotting", "plot"),
    "compare": ("spp.comparison", "compare_records"),
    "check": ("spp.verdicts", "check"),
    "SppError": ("spp.errors", "SppError"),
}

__all__ = [
    "DEFAULT_RULES",
    "Record",
    "Rule",
    "SignalRecorder",
    "Site",
    "SppError",
    "Tap",
    "__version__",
    "check",
    "compare",
    "find_taps",
    "load_record",
    "plot",
    "record",
    "save_record",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from spp.comparison import compare_records as compare
    from spp.discovery import DEFAULT_RULES, Rule, find_taps
    from spp.errors import SppError
    from spp.files import load_record, save_record
    from spp.hooks import SignalRecorder, record
    from spp.plotting import plot
    from spp.records import Record
    from spp.taps import Site, Tap
    from spp.verdicts import check


def __getattr__(name: str) -> Any:
    """Load a public name on first use, so ``import spp`` costs nothing heavy."""
    if name in _API:
        module, attribute = _API[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spp' has no attribute {name!r}")


assert set(__all__) == {"__version__", *_API}


def __dir__() -> list[str]:
    return sorted(__all__)

"""spp: Signal Propagation Plots for PyTorch (Brock, De, Smith 2021).

``import spp`` is light: torch, pandas and matplotlib load only when a function that needs them is used.
"""

__version__ = "0.1.0"

from spp.errors import SppError  # noqa: E402
from spp.record import Record  # noqa: E402

__all__ = ["Record", "SppError", "__version__"]

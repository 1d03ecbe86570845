"""``spp.plot``: a notebook's one call for a figure of records, with the reference curves when asked for.

The references of a record are recorded on the record's own inputs (``spp.references.references_for``), through
the same curve cache the CLI uses, so a notebook and ``spp plot`` draw the same references without recording them
twice. Drawing itself is ``spp.render.draw``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from spp.errors import SppError
from spp.records import Record
from spp.render import XAxis, draw


def plot(
    records: Record | Sequence[Record],
    *,
    references: str | Sequence[Record] | None = None,
    x: XAxis | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    axes: Any = None,
    use_cache: bool = True,
) -> Any:
    """Draw ``records`` over ``references`` and return the matplotlib Figure.

    ``references``: Records to draw behind; or a string as ``spp plot --reference`` takes it ("auto" for the three
    families of the record's kind at the matching depth, "nf_resnet", "bn_relu_resnet50,...", "none"), recorded
    now for the first record on its own inputs (or read from the curve cache); when no reference fits the record's
    input, a warning says why. ``x``: "block", "relative", or None (relative when the depths differ).
    """
    chosen = [records] if isinstance(records, Record) else list(records)
    if not chosen:
        raise SppError("plot needs at least one record")
    refs: Sequence[Record]
    if references is None:
        refs = ()
    elif isinstance(references, str):
        from spp.references import references_for

        notes: list[str] = []
        refs = references_for(chosen[0], references, use_cache=use_cache, notes=notes)
        for note in notes:
            warnings.warn(note, stacklevel=2)
    else:
        refs = list(references)
    return draw(chosen, references=refs, x=x, labels=labels, title=title, axes=axes)

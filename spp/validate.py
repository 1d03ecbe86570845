"""The one place each user-supplied value is checked: strict types, ranges, finiteness, booleans.

Used by the CLI, ``RunConfig``, model options and the input sources alike, so a value is refused with the same one
line wherever it enters, before any work starts. A value spp cannot honour is an error, never a silent clamp.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from spp.errors import SppError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_bool(value: object, what: str) -> bool:
    """A boolean from a bool, 0/1, or one of true/false/1/0/yes/no/on/off (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
    raise SppError(f"{what} must be true or false (or 1/0, yes/no), not {value!r}")


def whole_number(value: object, what: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SppError(f"{what} must be a whole number, not {value!r}")
    if minimum is not None and value < minimum:
        raise SppError(f"{what} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise SppError(f"{what} must be at most {maximum}, not {value}")
    return value


def finite_number(value: object, what: str, *, positive: bool = False, maximum: float | None = None) -> float:
    """A finite float (ints accepted), > 0 when ``positive``, at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SppError(f"{what} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise SppError(f"{what} must be a finite number, not {value!r}")
    if positive and number <= 0:
        raise SppError(f"{what} must be positive, not {value!r}")
    if maximum is not None and number > maximum:
        raise SppError(f"{what} must be at most {maximum:g}, not {value!r}")
    return number


def check_batching(batch_size: object, num_samples: object) -> None:
    """Micro-batch settings: a batch size of at least 1, and a sample count of at least 1 when given."""
    whole_number(batch_size, "--batch-size", minimum=1)
    if num_samples is not None:
        whole_number(num_samples, "--num-samples", minimum=1)


def parse_channel_dims(spec: int | str | Mapping[str, int] | Sequence[str] | None) -> list[tuple[str, int]]:
    """``channel_dim`` as (fnmatch pattern on tap or block names, axis) pairs; a bare axis applies to every tap.

    Accepts an int, a mapping ``{"stages.0.*": 1}``, or strings ``"stages.0.*=1"`` / ``"1"`` (repeatable
    ``--channel-dim``). The last matching pattern wins.
    """
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise SppError(f"channel_dim must be an axis or PATTERN=AXIS, not {spec!r}")
    if isinstance(spec, int):
        return [("*", spec)]
    items: list[tuple[str, object]]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        texts = [spec] if isinstance(spec, str) else list(spec)
        items = []
        for text in texts:
            if isinstance(text, int) and not isinstance(text, bool):
                items.append(("*", text))
                continue
            if not isinstance(text, str):
                raise SppError(f"--channel-dim must be AXIS or PATTERN=AXIS, not {text!r}")
            before, eq, after = text.rpartition("=")
            items.append(((before.strip() or "*") if eq else "*", after.strip()))
    out = []
    for key, given in items:
        value: int | None = None
        if isinstance(given, int) and not isinstance(given, bool):
            value = given
        elif isinstance(given, str) and given.lstrip("-").isdigit():
            value = int(given)
        if value is None or not -8 <= value < 8:
            raise SppError(f"--channel-dim {key}={given}: the axis must be a whole number between -8 and 7")
        out.append((str(key), value))
    return out

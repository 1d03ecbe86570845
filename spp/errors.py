"""One exception type for every mistake a user can make, so the CLI can print it as one line; and the helpers that
keep such messages to one line."""

from __future__ import annotations

from collections.abc import Iterable


class SppError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name.

    The CLI prints ``error: <message>`` and exits with ``exit_code``; library users catch it like any exception.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' suffix for an unknown name, or '' when nothing is close."""
    import difflib

    found = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(found)}?)" if found else ""


def one_line(exc: BaseException, limit: int = 200, *, with_type: bool = True) -> str:
    """An exception as one line of at most ``limit`` characters: ``Type: message`` with whitespace collapsed.

    Library errors (torch's dispatcher, PIL, pickle) span many lines; a one-line error keeps the cause readable.
    """
    text = " ".join(str(exc).split())
    if with_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

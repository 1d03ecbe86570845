"""One reporter for what a command tells its user besides its results: warnings and progress.

* **Warnings**: one line each (whitespace collapsed, no source line echoed), each distinct message once per
  command, ``warning: ...`` in yellow on a terminal and plain text when piped. Python ``warnings`` raised while a
  command runs (spp's own, torch's, timm's) are routed here by ``capture_warnings``, so nothing reaches the user as
  a raw ``UserWarning`` with a file name and a line of source.
* **Progress**: on a terminal, a rich progress bar per recording (micro-batches, elapsed time). Piped (a log file,
  CI, ``| tee``), a plain line ``recording nf_resnet600: batch 3/8, 95 s`` after ``first_line`` seconds of a
  recording and then every ``heartbeat`` seconds, from a background thread, so a single slow forward is not minutes
  of silence; quick work prints nothing.

The CLI makes one Reporter per command (``spp.cli``); ``reporter.progress()`` yields the ``spp.run.Progress``
callable every recording of the command shares. Imports rich only.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape

MAX_LINE = 600  # characters of one warning; a longer library message is cut with "..."


def one_line(message: object) -> str:
    """``message`` as one line: whitespace (newlines included) collapsed, at most ``MAX_LINE`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


@dataclass
class _Task:
    label: str
    total: int
    started: float
    done: int = 0
    announced: bool = False
    last_line: float = 0.0


class Reporter:
    """Warnings and progress of one command, on ``console`` (stderr by default). See the module docstring.

    ``heartbeat`` / ``first_line``: seconds between plain progress lines when not on a terminal, and before the
    first one; ``clock``: a monotonic clock (tests pass their own).
    """

    def __init__(self, console: Console | None = None, *, heartbeat: float = 30.0, first_line: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or Console(stderr=True)
        self.heartbeat = heartbeat
        self.first_line = first_line
        self.clock = clock
        self.shown: list[str] = []
        self.repeats: dict[str, int] = {}
        self._notes: set[str] = set()
        self._lock = threading.Lock()

    # ---- warnings ----------------------------------------------------------------------------------------------
    def warn(self, message: object) -> bool:
        """Print ``warning: <message>`` as one line unless this message was shown already; True when printed."""
        text = one_line(message)
        with self._lock:
            if text in self.repeats:
                self.repeats[text] += 1
                return False
            self.repeats[text] = 1
            self.shown.append(text)
        self.console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
        return True

    def note(self, message: object) -> None:
        """An informational line (``note: ...``), as one line, deduplicated like warnings."""
        text = one_line(message)
        with self._lock:
            if text in self._notes:
                return
            self._notes.add(text)
        self.console.print(f"[cyan]note:[/] {escape(text)}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def capture_warnings(self) -> Iterator[Reporter]:
        """Route Python warnings raised inside the block to ``warn`` (every occurrence reaches the reporter, which
        prints each distinct message once). Filters that ignore a category (DeprecationWarning by default) stay."""

        def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
            self.warn(message)

        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)  # our dedup replaces the once-per-location registry
            warnings.showwarning = show
            yield self

    # ---- progress ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[[str, int], Any]]:
        """Yield ``task(label, total)``: a context manager yielding ``on_batch(samples)``, as ``spp.run.Progress``.

        A bar on a terminal; periodic plain lines otherwise (see the module docstring).
        """
        if self.console.is_terminal:
            with self._bar() as task:
                yield task
            return
        with self._plain() as task:
            yield task

    @contextlib.contextmanager
    def _bar(self) -> Iterator[Callable[[str, int], Any]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                       TimeElapsedColumn(), console=self.console, transient=False)

        @contextlib.contextmanager
        def task(label: str, total: int) -> Iterator[Callable[[int], None]]:
            tid = bar.add_task(label, total=total)
            yield lambda n: bar.advance(tid, 1)
            bar.update(tid, completed=total)

        with bar:
            yield task

    @contextlib.contextmanager
    def _plain(self) -> Iterator[Callable[[str, int], Any]]:
        current: list[_Task] = []
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(min(1.0, self.heartbeat, self.first_line)):
                with self._lock:
                    task = current[-1] if current else None
                if task is not None:
                    due = self.heartbeat if task.announced else self.first_line
                    if self.clock() - task.last_line >= due:
                        self._line(task)

        @contextlib.contextmanager
        def task(label: str, total: int) -> Iterator[Callable[[int], None]]:
            t = _Task(label, total, self.clock())
            t.last_line = t.started
            with self._lock:
                current.append(t)

            def on_batch(samples: int) -> None:
                t.done += 1

            try:
                yield on_batch
            finally:
                with self._lock:
                    current.remove(t)
                if t.announced:
                    self.console.print(f"{escape(t.label)}: {t.done}/{t.total} batches in "
                                       f"{self.clock() - t.started:.0f} s", highlight=False, soft_wrap=True)

        thread = threading.Thread(target=beat, name="spp-progress", daemon=True)
        thread.start()
        try:
            yield task
        finally:
            stop.set()
            thread.join(timeout=5)

    def _line(self, task: _Task) -> None:
        """One plain progress line: the task, its micro-batches done, the time since it started."""
        now = self.clock()
        task.announced, task.last_line = True, now
        self.console.print(f"{escape(task.label)}: batch {task.done}/{task.total}, {now - task.started:.0f} s",
                           highlight=False, soft_wrap=True)

"""The reporter: warnings one line each and once, styled only on a terminal; progress lines when piped."""

from __future__ import annotations

import io
import time
import warnings

from rich.console import Console

from spp.report import Reporter


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=60, color_system="standard" if terminal else None), buf


def test_python_warnings_become_one_deduplicated_line_each():
    """The skipped-image warning came out three times with its source line; now once, on one line."""
    console, buf = _console(terminal=False)
    reporter = Reporter(console)
    long = "skipped 1 unreadable image(s)\n   e.g. a.jpg:   cannot identify image file " + "x" * 80
    with reporter.capture_warnings():
        for _ in range(3):
            warnings.warn(long, stacklevel=1)
        warnings.warn("another one", RuntimeWarning, stacklevel=1)
    lines = buf.getvalue().splitlines()
    expected = "warning: " + " ".join(long.split())
    assert lines == [expected, "warning: another one"]  # one line (wider than the 60-column console), no source
    assert reporter.repeats[" ".join(long.split())] == 3
    assert "\x1b[" not in buf.getvalue()  # plain when piped


def test_warnings_are_styled_on_a_terminal():
    console, buf = _console(terminal=True)
    Reporter(console).warn("careful")
    assert "\x1b[" in buf.getvalue() and "careful" in buf.getvalue()


def test_capture_restores_the_warning_machinery():
    before = warnings.showwarning
    with Reporter(_console(False)[0]).capture_warnings():
        assert warnings.showwarning is not before
    assert warnings.showwarning is before


def test_piped_progress_prints_periodic_lines_with_batch_and_elapsed_time():
    """first_line 0.05 s, heartbeat 0.1 s: a task of 0.35 s prints a first line, at least one more, and its end."""
    console, buf = _console(terminal=False)
    reporter = Reporter(console, heartbeat=0.1, first_line=0.05)
    with reporter.progress() as task, task("recording nf_resnet600", 2) as on_batch:
        time.sleep(0.2)
        on_batch(8)
        time.sleep(0.15)
        on_batch(8)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("recording nf_resnet600: batch 0/2, ") and lines[0].endswith(" s")
    assert any(line.startswith("recording nf_resnet600: batch 1/2") for line in lines[1:-1])
    assert lines[-1].startswith("recording nf_resnet600: 2/2 batches in ")


def test_quick_work_prints_nothing_when_piped():
    console, buf = _console(terminal=False)
    with Reporter(console, first_line=10.0).progress() as task, task("recording x", 1) as on_batch:
        on_batch(2)
    assert buf.getvalue() == ""

"""Shared helpers for the benchmarks: interleaved timing with medians, peak memory, markdown tables.

Not part of the test suite. Timings on a shared machine are noisy: every comparison interleaves its
candidates (A, B, A, B, ...) after a warm-up and reports medians, and a ratio is only ever taken between numbers
measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (a smoke run)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per candidate (median taken)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def interleaved(fns: dict[str, Callable[[], object] | tuple], reps: int, warmup: int = 1,
                samples: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median wall time (s) of each candidate, run in rounds A, B, C / B, C, A / C, A, B ... after ``warmup``
    rounds (the order rotates, so no candidate always runs first after a ``gc.collect``).

    A candidate is a function, or ``(enter, fn, exit)``: only ``fn`` is timed (e.g. hooks put in place by
    ``enter`` and removed by ``exit``, so the other candidates run without them). ``samples``, if given, receives
    every candidate's times, one per round in round order, for ``paired``.
    """
    def parts(c):
        return c if isinstance(c, tuple) else (None, c, None)

    def once(c) -> float:
        enter, fn, leave = parts(c)
        if enter is not None:
            enter()
        try:
            gc.collect()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        finally:
            if leave is not None:
                leave()

    for _ in range(warmup):
        for c in fns.values():
            once(c)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(once(fns[k]))
    if samples is not None:
        samples.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round: on a machine whose speed drifts (a shared
    VM), the two numbers of one round were taken seconds apart, so the drift mostly cancels."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> str:
    """A markdown table (with a heading and an optional note), also printed as it is made."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def run_json(args: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``python args...`` in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import platform

    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")

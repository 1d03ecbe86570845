"""CLI start-up: wall time of ``spp --help`` and ``spp models`` in fresh processes, and which heavy libraries
they import (none may be torch). Target: <= 0.3 s each."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import _common

HEAVY = ("torch", "timm", "torchvision", "pandas", "matplotlib", "numpy", "pyarrow")
PROBE = """
import json, sys
heavy_names = set(json.loads(sys.argv[2]))
sys.argv = ["spp", *json.loads(sys.argv[1])]
from spp.cli import main
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & heavy_names)
sys.stderr.write("HEAVY " + json.dumps(heavy) + "\\n")
"""


def wall(cmd: list[str], reps: int) -> float:
    env = {**os.environ, "PYTHONPATH": _common.ROOT}
    subprocess.run(cmd, capture_output=True, env=env, check=True)  # warm the file cache
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def heavy_imports(args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": _common.ROOT}, check=True)
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("HEAVY ")][-1]
    return json.loads(line[6:])


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    reps = args.reps or (3 if args.quick else 9)
    rows = []
    python = wall([sys.executable, "-c", "pass"], reps)
    for cmd in (["--help"], ["models"]):
        t = wall([sys.executable, "-m", "spp", *cmd], reps)
        heavy = heavy_imports(cmd)
        rows.append([f"spp {' '.join(cmd)}", t, t - python, _common.verdict(t, 0.3),
                     ", ".join(heavy) or "none"])
    _common.table("CLI start-up (fresh process, median wall time)",
                  ["command", "wall s", "minus bare python s", "<=0.3 s", "heavy libraries imported"], rows,
                  note=f"bare `python -c pass`: {python:.3f} s. {_common.machine()}")


if __name__ == "__main__":
    main()

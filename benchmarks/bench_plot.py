"""End to end: ``spp plot --model nf_resnet600`` with its defaults (three 600-layer references), with an empty
curve cache and with the references cached, beside ``spp record`` of the model alone (one model's build and
forward). Target: with the cache warm, a plot costs about one model's recording (plus drawing)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common


def timed(args: list[str], cache: str, cwd: str) -> float:
    env = {**os.environ, "PYTHONPATH": _common.ROOT, "SPP_CACHE_DIR": cache}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "spp", *args], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"spp {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="nf_resnet600")
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    extra = ["--width", "0.25", "--resolution", "64"] if args.quick else []
    cold, warm, alone = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for i in range(reps):
            cache = os.path.join(work, f"cache{i}")
            plot = ["plot", "--model", args.model, *extra, "--out", os.path.join(work, "spp.png")]
            cold.append(timed(plot, cache, work))
            warm.append(timed(plot, cache, work))
            alone.append(timed(["record", "--model", args.model, *extra, "--out", os.path.join(work, "r.json")],
                               cache, work))
    c, w, a = (statistics.median(v) for v in (cold, warm, alone))
    _common.table(f"End to end: spp plot --model {args.model}{' ' + ' '.join(extra) if extra else ''}",
                  ["run", "wall s", "vs spp record alone"],
                  [["spp plot, empty cache (model + 3 references recorded)", c, c / a],
                   ["spp plot, references cached", w, w / a],
                   ["spp record (the model alone)", a, 1.0]],
                  note=f"medians of {reps} fresh processes each; {_common.machine()}")


if __name__ == "__main__":
    main()

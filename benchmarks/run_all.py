"""Run every benchmark and write their tables to one markdown file.

    .venv/bin/python benchmarks/run_all.py --quick              # small sizes, a couple of minutes
    .venv/bin/python benchmarks/run_all.py --out results.md     # the full set (tens of minutes on a laptop CPU)
    .venv/bin/python benchmarks/run_all.py --only overhead,cli --threads 1

Each script also runs alone (``benchmarks/bench_*.py --help``). Each runs in its own process; within a script,
every ratio compares numbers measured in that run, candidates interleaved, medians after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = {
    "moments": "bench_moments.py",
    "overhead": "bench_overhead.py",
    "memory": "bench_memory.py",
    "build": "bench_build.py",
    "cli": "bench_cli.py",
    "plot": "bench_plot.py",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"), help="markdown file to write")
    p.add_argument("--only", default="", help=f"comma list of {', '.join(SCRIPTS)}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the timing scripts")
    p.add_argument("--baseline", default=None, help="git revision for bench_build's before/after of layers.py")
    args = p.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCRIPTS)
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parts = [f"# spp benchmarks{' (--quick)' if args.quick else ''}", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"python {platform.python_version()}", ""]
    failed = []
    for name in chosen:
        cmd = [sys.executable, os.path.join(HERE, SCRIPTS[name])]
        if args.quick:
            cmd.append("--quick")
        if args.threads and name in ("moments", "overhead", "memory"):
            cmd += ["--threads", str(args.threads)]
        if args.baseline and name == "build":
            cmd += ["--baseline", args.baseline]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        print(out.stdout, end="", flush=True)
        parts.append(f"## {name} ({time.perf_counter() - t:.0f} s)\n")
        if out.returncode != 0:
            failed.append(name)
            parts.append(f"FAILED (exit {out.returncode}):\n\n```\n{out.stderr[-3000:]}\n```\n")
            print(out.stderr[-3000:], file=sys.stderr)
        else:
            parts.append(out.stdout)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    print(f"wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The README as a user runs it: every code block executes, in order, in one folder, and writes what the README
says it writes; every measured number comes from examples/readme_numbers.py.

Tiny settings (documented in the README's "Development"): built-in models of depth 600 become depth 50; every
`spp` command on an image model gets --width 0.0625 (built-in models) --resolution 32, one on a token model
--seq-len 16 (--batch-size 2, or 4,2 for `spp bn`; --num-samples at most 16; torchrun --nproc-per-node 2); Python
blocks get width=0.0625 and 32 px inputs. The first block (install, test
suite) is what `.ci/run` executes; the "Development" block is checked to be what CI runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from typer.testing import CliRunner

from spp.cli import app
from spp.models import is_model
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TINY = {"--width": "0.0625", "--resolution": "32"}
RECORDING = ("plot", "record", "compare", "bn")


def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, code, the heading it sits under) of every fenced block, in order."""
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w+)\n(.*?)^```$", text, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            out.append((m.group(2), m.group(3), heading))
    return out


BLOCKS = code_blocks(README)
SETUP, DEVELOPMENT = BLOCKS[0], next(b for b in BLOCKS if b[2] == "Development")
RUN = [b for b in BLOCKS if b is not SETUP and b is not DEVELOPMENT]


def tiny_args(args: list[str]) -> list[str]:
    """An `spp` command line at tiny size (the module docstring)."""
    args = [re.sub(r"(resnet)600\b", r"\g<1>50", a) for a in args]
    command = args[0]
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in TINY:
            out[i + 1] = TINY[a]
        elif a == "--batch-size":
            out[i + 1] = "4,2" if command == "bn" else "2"
        elif a == "--num-samples":
            out[i + 1] = str(min(int(out[i + 1]), 16))
    token_model = any(a.startswith("hf:") or "_transformer" in a for a in out)
    model = out[out.index("--model") + 1] if "--model" in out else ""
    builtin = is_model(model.split("?")[0])
    if (command in RECORDING or command == "blocks") and not token_model:
        for flag, value in TINY.items():
            if flag in out or (command == "blocks" and flag == "--resolution"):
                continue
            if flag == "--width" and model and not builtin:
                continue  # --width is an option of the built-in models only
            out += [flag, value]
    if token_model and command in ("plot", "record", "compare") and "--seq-len" not in out:
        out += ["--seq-len", "16"]
    if command in ("plot", "record", "compare") and "--batch-size" not in out:
        out += ["--batch-size", "2"]
    return out


def tiny_python(code: str) -> str:
    code = re.sub(r"(resnet)600\b", r"\g<1>50", code)
    code = re.sub(r"width=0\.25\b", "width=0.0625", code)
    return re.sub(r"\b(128|64|224), \1\)", "32, 32)", code)


def run_shell(code: str, cwd: Path, *, processes: bool = False) -> None:
    """Run a bash block's `spp` lines in-process (``processes=False``) or its `torchrun` lines (``True``)."""
    for line in code.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv or (argv[0] == "torchrun") != processes:
            continue
        if argv[0].endswith("spp"):
            result = CliRunner().invoke(app, tiny_args(argv[1:]))
            said = re.search(r"#\s*exit (\d)", line)  # a line documenting its exit code ("# exit 1: mean_shift")
            assert result.exit_code == (int(said.group(1)) if said else 0), f"{line}\n{result.output}"
            assert "Traceback" not in result.output
        elif argv[0] == "torchrun":
            nproc = argv.index("--nproc-per-node")
            argv[nproc + 1] = "2"
            module = argv.index("-m")
            cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:module], "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "spp", *tiny_args(argv[module + 2:])]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=240)
            assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        else:
            raise AssertionError(f"the README runs a command this test does not know: {line}")


def run_python(code: str) -> None:
    try:
        exec(compile(tiny_python(code), "<README block>", "exec"), {"__name__": "__readme__"})
    finally:
        plt.close("all")


# What each section's blocks write, as the README says.
WRITES = {
    "Then the main job:": ["spp.png", "spp.csv"],
    "Records and comparison": ["nf.pt", "nf_nows.pt", "compare.png", "compare.csv", "compare_specs.png",
                               "spp_0.pt", "spp_1.pt", "spp_2.pt"],
    'BatchNorm under the microscope: `spp bn`': ["ema20.pt", "bn.csv", "precise.pt", "bn.png"],
    "Scaling past one process": ["spp_ddp.pt"],
}


def test_every_readme_block_runs_in_order(tmp_path, monkeypatch):
    """The blocks run one after another in one folder (the notebook block reads the records the CLI block wrote)
    and leave the files the README names; nothing raises, no command fails (torchrun lines: the next test)."""
    monkeypatch.chdir(tmp_path)
    assert len(RUN) >= 7, [h for _, _, h in RUN]
    for language, code, heading in RUN:
        if language == "bash":
            run_shell(code, tmp_path)
        elif language == "python":
            run_python(code)
        else:
            raise AssertionError(f"a {language} block under {heading!r}")
    made = {p.name for p in tmp_path.iterdir()}
    expected = {f for files in WRITES.values() for f in files}
    assert expected <= made, sorted(expected - made)


def test_readme_torchrun_lines_run(tmp_path):
    """The README's torchrun lines, 2 CPU processes (gloo): rank 0 writes the figure it names."""
    lines = [code for language, code, _ in RUN if language == "bash" and "torchrun" in code]
    assert lines
    for code in lines:
        run_shell(code, tmp_path, processes=True)
    assert (tmp_path / "ddp.png").is_file() and (tmp_path / "ddp.csv").is_file()


def test_main_job_block_is_the_plot_command():
    """The block after "Then the main job:" is one `spp plot` line (it is what a new user runs first)."""
    main = README.split("Then the main job:", 1)[1]
    (language, code, _), *_ = code_blocks(main)
    assert language == "bash" and code.strip() == ".venv/bin/spp plot --model nf_resnet600"


def test_development_block_is_what_ci_runs():
    """CI (.ci/run) runs every line of the README's Development block; this test runs the quick ones."""
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [shlex.split(line, comments=True) for line in DEVELOPMENT[1].splitlines()]
    lines = [argv for argv in lines if argv]
    assert [argv[0].rsplit("/", 1)[-1] for argv in lines] == ["ruff", "mypy", "python", "python"]
    for argv in lines:
        text = " ".join(argv)
        if "pytest" in text:
            assert "python -m pytest" in SETUP[1]  # .ci/run executes the README's first block
        else:
            assert text in ci, text
    bin_dir = Path(sys.executable).parent
    for argv in (lines[0], lines[2]):
        cmd = [str(bin_dir / argv[0].rsplit("/", 1)[-1]) if argv[0].endswith("ruff") else sys.executable, *argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


# ---- the numbers -------------------------------------------------------------------------------------------------
def _numbers_script():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "examples" / "readme_numbers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def form(text: str) -> str:
    """A section with its numbers (and the backticked names and commands that hold numbers) masked."""
    text = re.sub(r"`python examples/readme_numbers\.py[^`]*`", "`CMD`", text)
    text = re.sub(r"`[^`]*\d[^`]*`", "`#`", text)
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", text)


TINY_NUMBERS = ["--depth", "50", "--width", "0.0625", "--resolution", "32", "--batch-size", "2", "--bn-width",
                "0.0625", "--bn-resolution", "32", "--bn-samples", "16", "--bn-batch-sizes", "8,2,4,16",
                "--ema-updates", "3", "--hf-spec", "hf:gpt2?n_layer=2,n_embd=32,n_head=2", "--tf-depths", "6,12",
                "--tf-width", "32", "--seq-len", "16"]


def test_readme_numbers_come_from_the_script(capsys):
    """The script at tiny size goes through the code paths of the README's numbers (spp.commands): each of its
    sections has the README section's form, number for number; the README shows the command under each."""
    script = _numbers_script()
    readme = script.readme_sections(README)
    made = script.main(TINY_NUMBERS)
    capsys.readouterr()
    assert sorted(made) == sorted(readme) == ["blocks", "bn", "compare", "gradients", "how-to-read", "norms",
                                             "transformers"]
    for name, text in made.items():
        assert form(text) == form(readme[name]), name
        assert f"<sub>Numbers: `python examples/readme_numbers.py` (section `{name}`).</sub>" in readme[name]


@pytest.mark.skipif(os.environ.get("SPP_README_FULL") != "1", reason="minutes: set SPP_README_FULL=1")
def test_readme_numbers_equal_a_full_run(capsys):
    made = _numbers_script().main([])
    readme = _numbers_script().readme_sections(README)
    for name, text in made.items():
        assert text == readme[name], name

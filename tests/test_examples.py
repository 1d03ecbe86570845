"""The example scripts run end to end at a tiny size and write real images, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MPLBACKEND": "Agg", **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _assert_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 200
        # not blank: a drawn figure has many colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_paper_figures(tmp_path):
    result = _run([str(EXAMPLES / "paper_figures.py"), "--depth", "50", "--width", "0.0625", "--resolution", "32",
                   "--batch-size", "2", "--out-dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure1.png", "figure2.png"]
    for name in ("figure1.png", "figure2.png"):
        _assert_png(tmp_path / name)
    for label in ("BN-ReLU-Conv ResNet-50", "ReLU-BN-Conv ResNet-50", "NF-ResNet-50 (Scaled WS)",
                  "NF-ResNet-50 (no Scaled WS)"):
        assert label in result.stdout


def test_paper_figures_rejects_unknown_depth(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "paper_figures.py"), "--depth", "51", "--out-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 51" in result.stderr
    assert not list(tmp_path.iterdir())


def test_notebook(tmp_path):
    text = (EXAMPLES / "notebook.py").read_text()
    assert text.count("# %%") >= 8 and "format_name: percent" in text
    env = {"SPP_EXAMPLE_OUT": str(tmp_path), "SPP_EXAMPLE_RESOLUTION": "32", "SPP_EXAMPLE_BATCH": "2",
           "SPP_EXAMPLE_WIDTH": "0.0625"}
    result = _run([str(EXAMPLES / "notebook.py")], env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "resnet18.png", "resnet18.pt"]
    _assert_png(tmp_path / "resnet18.png")
    _assert_png(tmp_path / "compare.png")
    assert "aligned by tap name (8 blocks after the stem)" in result.stdout
    assert "aligned by relative depth" in result.stdout


def test_bn_report(tmp_path):
    out = tmp_path / "bn.png"
    result = _run([str(EXAMPLES / "bn_report.py"), "--width", "0.0625", "--resolution", "32", "--batch-size", "4",
                   "--ema-updates", "3", "--num-samples", "16", "--sweep", "2,4", "--sweep-samples", "8",
                   "--plot", str(out)])
    _assert_png(out)
    for text in ("1. EMA buffers vs PreciseBN over 16 samples (4 micro-batches)", "worst layer",
                 "max over blocks of |log10 ratio| of avg_var", "3. Normalisation batch size"):
        assert text in result.stdout


def test_transformer_references():
    """The NF line's theory is 1 + k alpha^2: 1.04 after the first branch, 1 + 12 * 0.04 = 1.48 after layer 6's
    MLP; every family's stem is the standardised embedding (variance close to 1 on 4 x 8 random ids)."""
    result = _run([str(EXAMPLES / "transformer_references.py"), "--depths", "6", "--width", "32", "--seq-len", "8",
                   "--batch-size", "4"])
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert sorted(lines) == ["nf_transformer6", "postln_transformer6", "preln_transformer6"]
    nf = lines["nf_transformer6"]
    assert nf[4] == "1.040" and nf[8] == "1.480", nf
    assert all(0.7 < float(cols[1]) < 1.3 for cols in lines.values())


def test_check_in_ci_passes_for_a_good_block_and_fails_for_a_broken_one(monkeypatch):
    """The copyable CI test passes as shipped (a BN-ReLU-Conv block: each adds about 1 - 1/pi to the variance,
    linear growth, no mean) and fails once the block is swapped for one that breaks signal propagation: He init
    without normalisation gives Var(branch) = 2 E[relu(x)^2] = Var(x) + mean^2, so the variance doubles every block
    (geometric growth: the branch exponent is 1) and the ReLU's mean accumulates."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(EXAMPLES / "check_in_ci.py")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}, cwd=EXAMPLES.parent)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    sys.path.insert(0, str(EXAMPLES))
    try:
        import check_in_ci
    finally:
        sys.path.remove(str(EXAMPLES))
    import pytest

    monkeypatch.setattr(check_in_ci, "MyBlock", check_in_ci.BrokenBlock)
    with pytest.raises(AssertionError, match="breaks signal propagation") as failed:
        check_in_ci.test_my_block_keeps_signal_propagation()
    assert "error: variance_growth" in str(failed.value)

"""--device and --dtype resolve to what exists here, or fail in one line.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from spp.cli import app
from spp.devices import resolve_device, resolve_dtype
from spp.errors import SppError

CUDA = torch.cuda.is_available()

MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")




# ---- --device -----------------------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if CUDA else "mps" if MPS else "cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(SppError, match="--device"):
            resolve_device(bad)


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_unavailable_cuda_is_one_line_error():
    with pytest.raises(SppError, match=r"--device cuda: .*use --device cpu"):
        resolve_device("cuda")
    result = CliRunner().invoke(app, ["record", "--model", "nf_resnet50", "--width", "0.125", "--device", "cuda",
                                      "--out", "x.json"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_too_high_cuda_index_or_missing_mps():
    with pytest.raises(SppError, match="--device"):
        resolve_device(f"cuda:{torch.cuda.device_count() + 3}")
    if not MPS:
        with pytest.raises(SppError, match="MPS"):
            resolve_device("mps")


# ---- --dtype ------------------------------------------------------------------------------------------------------
def test_resolve_dtype():
    assert resolve_dtype("float32") is None
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(SppError, match="--dtype must be one of float32, bfloat16, float16"):
        resolve_dtype("int8")


def test_cli_rejects_bad_dtype():
    result = CliRunner().invoke(app, ["record", "--model", "nf_resnet50", "--dtype", "int8", "--out", "x.json"])
    assert result.exit_code == 2 and "--dtype" in result.output


"""Where and in what precision the forward runs: ``--device`` and ``--dtype`` resolved to what exists here.

Statistics never follow ``--dtype``: they accumulate in float32 or better whatever the forward's precision
(``spp.moments``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from spp.errors import SppError

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES: dict[str, torch.dtype | None] = {
    "float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(spec: str | None) -> torch.device:
    """``--device`` -> a torch.device that exists here: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).

    Under torchrun, plain ``cuda`` is this rank's GPU (``cuda:LOCAL_RANK``). Anything unavailable is an SppError.
    """
    from spp.distributed import local_device

    text = (spec if spec is not None else "cpu").strip().lower()
    if not text:
        raise SppError("--device is empty; use cpu, cuda, cuda:N, mps or auto")
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            text = "mps"
        else:
            text = "cpu"
    text = local_device(text)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise SppError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SppError(f"--device {spec}: {why}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SppError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                           f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise SppError(f"--device {spec}: MPS (Apple GPU) is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise SppError(f"--device {spec}: {device.type} is not available here; use cpu, cuda, mps or auto")
    return device


def resolve_dtype(spec: str | None) -> torch.dtype | None:
    """``--dtype`` -> the autocast dtype (None for float32: the forward runs as the model is)."""
    text = (spec or "float32").strip().lower()
    if text not in _DTYPE_ALIASES:
        raise SppError(f"--dtype must be one of {', '.join(DTYPES)}, not {spec!r}")
    return _DTYPE_ALIASES[text]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device`` for the forward (weights keep their dtype; nothing cached)."""
    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
    except (RuntimeError, ValueError) as exc:
        raise SppError(f"--dtype {str(dtype).removeprefix('torch.')} is not supported on {device.type}: "
                       f"{str(exc).splitlines()[0]}") from None


def off_cpu(model: torch.nn.Module) -> bool:
    """True when some parameter or buffer of ``model`` is not on the CPU (then ``--device cpu`` moves it)."""
    import itertools

    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first is not None and first.device.type != "cpu"

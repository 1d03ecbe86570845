"""One recording run from plain settings: resolve the model, make the inputs, hook, forward, return a Record.

``RunConfig`` holds everything the CLI's model and input options say, so ``spp plot``, ``spp record``,
``spp compare`` and notebooks build runs the same way.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from spp.errors import SppError
from spp.record import Record

# Built-in ResNets downsample by 32: below this the last stage has no spatial extent left.
MIN_RESOLUTION = 32


@dataclass(frozen=True)
class RunConfig:
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    trust_pickle: bool = False
    blocks: tuple[str, ...] = ()
    residual_tap: str | None = None
    channel_dim: int | None = None
    input: str | None = None  # None = Gaussian
    input_std: float = 1.0
    num_samples: int | None = None  # None = one micro-batch
    batch_size: int = 8
    resolution: int | None = None  # None = the model's default
    in_chans: int | None = None
    seed: int = 0
    mode: str = "train"
    device: str = "cpu"
    dtype: str = "float32"
    label: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("train", "eval"):
            raise SppError(f"--mode must be train or eval, not {self.mode!r}")
        if self.batch_size < 1:
            raise SppError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.num_samples is not None and self.num_samples < 1:
            raise SppError(f"--num-samples must be at least 1, not {self.num_samples}")
        if self.resolution is not None and self.resolution < 1:
            raise SppError(f"--resolution must be positive, not {self.resolution}")

    def with_model(self, model: str, **kwargs: Any) -> RunConfig:
        return replace(self, model=model, model_kwargs=kwargs, checkpoint=None, pretrained=False, blocks=(),
                       residual_tap=None, label=None)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        return d


def default_resolution(cfg: RunConfig, data_config: dict[str, Any]) -> int:
    if cfg.resolution is not None:
        return cfg.resolution
    size = data_config.get("input_size")
    return int(size[-1]) if size else DEFAULT_RESOLUTION


DEFAULT_RESOLUTION = 128


# progress(label, total_batches) -> a context manager yielding an on_batch(samples) callback
Progress = Callable[[str, int], "contextlib.AbstractContextManager[Callable[[int], None]]"]


@contextlib.contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def library_versions() -> dict[str, str]:
    """Versions worth keeping with a record beside torch's and spp's (which the recorder adds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("timm", "torchvision"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(spec: str | None):
    """``--device`` -> a torch.device that exists here: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).

    Under torchrun, plain ``cuda`` is this rank's GPU (``cuda:LOCAL_RANK``). Anything unavailable is an SppError.
    """
    import torch

    from spp.distributed import local_device

    text = (spec or "cpu").strip().lower()
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


def resolve_dtype(spec: str | None):
    """``--dtype`` -> the autocast dtype (None for float32: the forward runs as the model is)."""
    import torch

    text = (spec or "float32").strip().lower()
    aliases = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if text not in aliases:
        raise SppError(f"--dtype must be one of {', '.join(DTYPES)}, not {spec!r}")
    return aliases[text]


def _autocast(device, dtype):
    """Autocast to ``dtype`` on ``device`` for the forward (weights keep their dtype; nothing cached)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
    except (RuntimeError, ValueError) as exc:
        raise SppError(f"--dtype {str(dtype).removeprefix('torch.')} is not supported on {device.type}: "
                       f"{str(exc).splitlines()[0]}") from None


def record_model(cfg: RunConfig, *, progress: Progress | None = None, loaded=None) -> Record:
    """Record the SPP of ``cfg.model`` on ``cfg``'s inputs; ``progress`` gets one task of micro-batches.

    The forward runs on ``cfg.device``, under autocast to ``cfg.dtype`` when that is not float32; statistics are
    always accumulated in float32 or better. A model passed in ``loaded`` is moved to ``cfg.device`` in place
    (``nn.Module.to``); its weights keep their dtype. Under torchrun (``spp.distributed``) every rank records its
    share of the micro-batches and every rank returns the merged Record.
    """
    from spp import distributed, hooks
    from spp.inputs import make_input
    from spp.loading import load_model

    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)  # fail before a slow build
    ctx = distributed.init_from_env(device)
    if loaded is None:
        import torch

        torch.manual_seed(cfg.seed)  # the model's init is part of the experiment: same seed, same weights
        loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                            checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    model = loaded.model.to(device) if device.type != "cpu" or _off_cpu(loaded.model) else loaded.model
    resolution = default_resolution(cfg, loaded.data_config)
    if loaded.source == "spp" and resolution < MIN_RESOLUTION:
        raise SppError(f"--resolution {resolution} is too small for {cfg.model}: it downsamples by 32, "
                       f"use at least {MIN_RESOLUTION}")
    in_chans = cfg.in_chans or cfg.model_kwargs.get("in_chans") or 3
    source = make_input(cfg.input, num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                        std=cfg.input_std, data_config=loaded.data_config, resolution=resolution, in_chans=in_chans)
    settings = {
        "model": loaded.name,
        "label": cfg.label or loaded.name,
        "model_spec": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "source": loaded.source,
        "resolution": resolution,
        **source.describe(),
        **library_versions(),
        "run": cfg.describe(),
    }
    if ctx.active:
        settings["world_size"] = ctx.world_size
    indices = ctx.shard(source.num_batches) if ctx.active else None
    total = len(indices) if indices is not None else source.num_batches
    try:
        with (progress or no_progress)(f"recording {cfg.label or loaded.name}", total) as on_batch, \
                _autocast(device, dtype):
            return hooks.record(
                model,
                source.batches(indices, device=device),
                mode=cfg.mode,
                blocks=list(cfg.blocks) or None,
                residual_tap=cfg.residual_tap,
                channel_dim=cfg.channel_dim,
                settings=settings,
                on_batch=on_batch,
                distributed=ctx.active,
            )
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"\s+", " ", first)[:300]
        raise SppError(f"{loaded.name} failed on input of shape (batch, {in_chans}, {resolution}, {resolution}): "
                       f"{first}") from None


def _off_cpu(model) -> bool:
    """True when some parameter or buffer of ``model`` is not on the CPU (then ``--device cpu`` moves it)."""
    import itertools

    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first is not None and first.device.type != "cpu"

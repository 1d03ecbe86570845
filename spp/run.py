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


def record_model(cfg: RunConfig, *, progress: Progress | None = None, loaded=None) -> Record:
    """Record the SPP of ``cfg.model`` on ``cfg``'s inputs; ``progress`` gets one task of micro-batches."""
    from spp import hooks
    from spp.inputs import make_input
    from spp.loading import load_model

    if loaded is None:
        import torch

        torch.manual_seed(cfg.seed)  # the model's init is part of the experiment: same seed, same weights
        loaded = load_model(cfg.model, model_kwargs=cfg.model_kwargs, pretrained=cfg.pretrained,
                            checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    model = loaded.model
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
    try:
        with (progress or no_progress)(f"recording {cfg.label or loaded.name}", source.num_batches) as on_batch:
            return hooks.record(
                model,
                source.batches(),
                mode=cfg.mode,
                blocks=list(cfg.blocks) or None,
                residual_tap=cfg.residual_tap,
                channel_dim=cfg.channel_dim,
                settings=settings,
                on_batch=on_batch,
            )
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"\s+", " ", first)[:300]
        raise SppError(f"{loaded.name} failed on input of shape (batch, {in_chans}, {resolution}, {resolution}): "
                       f"{first}") from None

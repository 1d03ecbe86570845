"""One recording run from plain settings: resolve the model, make the inputs, hook, forward, return a Record.

``RunConfig`` holds everything the CLI's model and input options say, so ``spp plot``, ``spp record``,
``spp compare``, the reference curves and notebooks build runs the same way; a Record keeps its RunConfig in
``settings["run"]`` so the run can be rebuilt exactly (``RunConfig.from_settings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from spp.errors import SppError
from spp.labels import config_label
from spp.records import Record
from spp.validate import check_run_settings

# Built-in ResNets downsample by 32: below this the last stage has no spatial extent left.
MIN_RESOLUTION = 32
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class RunConfig:
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    trust_pickle: bool = False
    blocks: tuple[str, ...] = ()
    residual_tap: str | None = None
    channel_dim: tuple[str, ...] = ()  # AXIS or PATTERN=AXIS where the layers do not prove it
    input: str | None = None  # None = Gaussian
    input_std: float = 1.0
    seq_len: int | None = None  # tokens per sequence for token models; None = the model's own, else 128
    num_samples: int | None = None  # None = one micro-batch
    batch_size: int = DEFAULT_BATCH_SIZE
    resolution: int | None = None  # None = the model's default
    in_chans: int | None = None
    seed: int = 0
    mode: str = "train"
    stochastic: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    label: str | None = None
    grad: bool = False  # also back-propagate a loss and record the gradient statistics (spp.gradients)
    loss: str = "random"  # the loss of --grad: random (a seeded random projection of the output) or xent

    def __post_init__(self) -> None:
        check_run_settings(asdict(self))  # every field, before anything is loaded (spp.validate)

    def with_model(self, model: str, **kwargs: Any) -> RunConfig:
        """The same inputs for another model (nothing of this model's loading carried over)."""
        return replace(self, model=model, model_kwargs=kwargs, checkpoint=None, pretrained=False, blocks=(),
                       residual_tap=None, label=None)

    def describe(self) -> dict[str, Any]:
        """Plain data for a Record's settings; ``from_settings`` turns it back into this RunConfig."""
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        d["channel_dim"] = list(self.channel_dim)
        return d

    @classmethod
    def from_settings(cls, run: dict[str, Any]) -> RunConfig:
        """The RunConfig a Record was made with (its ``settings["run"]``); unknown keys of newer spp are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in run.items() if k in known}
        values["blocks"] = tuple(values.get("blocks") or ())
        dims = values.get("channel_dim")
        values["channel_dim"] = (f"{dims}",) if isinstance(dims, int) else tuple(str(d) for d in dims or ())
        values["model_kwargs"] = dict(values.get("model_kwargs") or {})
        return cls(**values)


def default_resolution(cfg: RunConfig, data_config: dict[str, Any]) -> int:
    """``--resolution``, else the model's own input size, else the inputs' ``DEFAULT_RESOLUTION``."""
    from spp.inputs import DEFAULT_RESOLUTION

    if cfg.resolution is not None:
        return cfg.resolution
    size = data_config.get("input_size")
    return int(size[-1]) if size else DEFAULT_RESOLUTION


# progress(label, total_batches) -> a context manager yielding an on_batch(samples) callback
Progress = Callable[[str, int], "contextlib.AbstractContextManager[Callable[[int], None]]"]


@contextlib.contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def library_versions() -> dict[str, str]:
    """Versions worth keeping with a record beside torch's and spp's (which the recorder adds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("timm", "torchvision", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _builtin_seq_len(cfg: RunConfig) -> dict[str, Any]:
    """The model options of ``cfg``, with ``--seq-len`` passed on to a built-in reference transformer (its theory
    is derived for one sequence length, so it is built for the length it will get) unless its options set one."""
    from spp.loading import split_options
    from spp.models import get_entry, is_model

    base, options = split_options(cfg.model)
    if (cfg.seq_len is None or not is_model(base) or get_entry(base).family.kind != "transformer"
            or "seq_len" in cfg.model_kwargs or "seq_len" in options):
        return dict(cfg.model_kwargs)
    return {**cfg.model_kwargs, "seq_len": cfg.seq_len}


def record_run(cfg: RunConfig, *, progress: Progress | None = None, loaded: Any = None) -> Record:
    """Record the SPP of ``cfg.model`` on ``cfg``'s inputs; ``progress`` gets one task of micro-batches.

    The forward runs on ``cfg.device``, under autocast to ``cfg.dtype`` when that is not float32; statistics are
    always accumulated in float32 or better. A model passed in ``loaded`` (a ``LoadedModel``) is moved to
    ``cfg.device`` in place (``nn.Module.to``); its weights keep their dtype. Under torchrun (``spp.distributed``)
    every rank records its share of the micro-batches and every rank returns the merged Record.
    """
    from spp import distributed, hooks
    from spp.devices import autocast, off_cpu, resolve_device, resolve_dtype
    from spp.inputs import make_input
    from spp.loading import load_model

    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)  # fail before a slow build
    ctx = distributed.init_from_env(device)
    if loaded is None:
        import torch

        torch.manual_seed(cfg.seed)  # the model's init is part of the experiment: same seed, same weights
        loaded = load_model(cfg.model, model_kwargs=_builtin_seq_len(cfg), pretrained=cfg.pretrained,
                            checkpoint=cfg.checkpoint, trust_pickle=cfg.trust_pickle)
    model = loaded.model.to(device) if device.type != "cpu" or off_cpu(loaded.model) else loaded.model
    if cfg.mode == "train" and cfg.batch_size == 1 and _has_batch_statistics(model):
        raise SppError("--batch-size 1 with BatchNorm in train mode: each sample would be normalised on its own; "
                       "use --batch-size 2 or more, or --mode eval")
    resolution = default_resolution(cfg, loaded.data_config)
    if loaded.source == "spp" and not loaded.takes_tokens and resolution < MIN_RESOLUTION:
        raise SppError(f"--resolution {resolution} is too small for {cfg.model}: it downsamples by 32, "
                       f"use at least {MIN_RESOLUTION}")
    in_chans = cfg.in_chans or cfg.model_kwargs.get("in_chans") or 3
    source = make_input(cfg.input, num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                        std=cfg.input_std, data_config=loaded.data_config, resolution=resolution, in_chans=in_chans,
                        tokens=loaded.tokens, seq_len=cfg.seq_len)
    source, batching = normalisation_batches(source, cfg.mode == "train" and _has_batch_statistics(model))
    label = config_label(cfg)
    settings = {
        "model": loaded.name,
        "label": label,
        "model_spec": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "source": loaded.source,
        **({"resolution": resolution} if not loaded.takes_tokens else {"model_inputs": "tokens"}),
        **source.describe(),
        **batching,
        **library_versions(),
        "run": cfg.describe(),
    }
    if ctx.active:
        settings["world_size"] = ctx.world_size
    indices = ctx.shard(source.num_batches) if ctx.active else None
    total = len(indices) if indices is not None else source.num_batches
    try:
        with (progress or no_progress)(f"recording {label}", total) as on_batch, \
                autocast(device, dtype):
            rec = hooks.record(
                model,
                source.batches(indices, device=device),
                mode=cfg.mode,  # type: ignore[arg-type]  # checked in RunConfig
                stochastic=cfg.stochastic,
                blocks=list(cfg.blocks) or None,
                residual_tap=cfg.residual_tap,
                channel_dim=list(cfg.channel_dim) or None,
                settings=settings,
                on_batch=on_batch,
                distributed=ctx.active,
                grad=cfg.grad,
                loss=cfg.loss,
                loss_seed=cfg.seed,
                batch_indices=indices,
            )
    except SppError:
        raise
    except BaseException as exc:  # the forward is the user's code: any failure (SystemExit too) is one line
        from spp.inputs import input_hint
        from spp.loading import user_code_error

        shape = ", ".join(str(d) for d in settings.get("input_shape") or ())
        raise user_code_error(exc, f"{loaded.name}'s forward", input_hint(source),
                              failed=f"failed on input of shape (batch, {shape})") from None
    if "skipped_images" in settings:  # images are read during the forward: count the unreadable ones now
        rec.settings["skipped_images"] = source.describe()["skipped_images"]
    _theory_for_unit_inputs(rec, cfg, label)
    return rec


def _theory_for_unit_inputs(rec: Record, cfg: RunConfig, label: str) -> None:
    """Blank ``expected_var`` (with a warning) when the input is generated with ``--input-std`` other than 1: the
    built-in models' expected variances (NF beta bookkeeping, the reference transformers' derivations) assume
    unit-variance inputs, and a theory line drawn for another input would be silently wrong."""
    import math
    import warnings

    generated = rec.settings.get("input") in ("gaussian", "embeddings")
    if not generated or cfg.input_std == 1.0 or not any(math.isfinite(r["expected_var"]) for r in rec.rows):
        return
    for r in rec.rows:
        r["expected_var"] = math.nan
    warnings.warn(f"{label}: no expected-variance line: its theory assumes unit-variance inputs, and --input-std "
                  f"{cfg.input_std:g} multiplies the input's variance by {cfg.input_std ** 2:g}", stacklevel=2)


def normalisation_batches(source: Any, batch_statistics: bool) -> tuple[Any, dict[str, Any]]:
    """The micro-batches a recording uses, and settings that say so truthfully.

    Without batch statistics (no BatchNorm in train mode) every sample is used: micro-batches merge exactly
    whatever their sizes. With them each micro-batch is a normalisation batch, so all of them hold exactly
    ``--batch-size`` samples: a shorter last one (which would be normalised over fewer samples, or not at all
    with one sample) is dropped, with one warning saying how many samples were used. Fewer samples than
    ``--batch-size`` make one micro-batch of all of them (at least 2), which the warning names as the
    normalisation batch. Returns the source to record and ``{"micro_batch_sizes", "samples_dropped"}``.
    """
    import warnings

    from spp.inputs import limit_samples

    total, size = source.num_samples, source.batch_size
    full = total // size * size
    dropped = 0
    if batch_statistics and total < 2:
        raise SppError(f"{total} sample with BatchNorm in train mode: it would be normalised on its own; give 2 or "
                       "more samples, or use --mode eval")
    if batch_statistics and full == 0:
        warnings.warn(f"{total} samples, fewer than --batch-size {size}: BatchNorm in train mode normalises them as "
                      f"one micro-batch of {total}", stacklevel=2)
    elif batch_statistics and full < total:
        dropped = total - full
        source = limit_samples(source, full)
        warnings.warn(f"used {full} of {total} samples: BatchNorm in train mode normalises each micro-batch with "
                      f"its own statistics, so every micro-batch holds --batch-size {size}; the last {dropped} "
                      f"would be normalised on their own (--num-samples a multiple of {size} uses them all)",
                      stacklevel=2)
    sizes = sorted({len(source.batch_slice(j)) for j in range(source.num_batches)}, reverse=True)
    return source, {"num_samples": source.num_samples, "micro_batch_sizes": sizes, "samples_dropped": dropped}


def _has_batch_statistics(model: Any) -> bool:
    from spp.modelstate import uses_batch_statistics

    return any(uses_batch_statistics(m) for m in model.modules())


def record_cached(cfg: RunConfig, *, progress: Progress | None = None, use_cache: bool = True) -> Record:
    """``record_run(cfg)``, or its curve from the on-disk cache when ``cfg`` is a cacheable run (``spp.cache``:
    built-in models, randomly initialised) that was recorded before."""
    from spp import cache, distributed
    from spp.devices import resolve_device

    if distributed.env_context().active:
        distributed.init_from_env(resolve_device(cfg.device))  # the cache's hit-or-miss broadcast needs the group
    return cache.cached_record(cfg, lambda: record_run(cfg, progress=progress), use_cache=use_cache)

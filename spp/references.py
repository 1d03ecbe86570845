"""The reference SPPs drawn behind a user's model: BN-ReLU-Conv, ReLU-BN-Conv and NF-ResNet at a matching depth."""

from __future__ import annotations

from dataclasses import replace

from spp.errors import SppError, close_matches
from spp.loading import split_options
from spp.models import REFERENCE_FAMILIES, get_entry, is_model, nearest_depth
from spp.record import Record
from spp.run import Progress, RunConfig, record_model


def reference_names(spec: str | None, num_blocks: int) -> list[str]:
    """``None``/"" -> the three families at the depth closest to ``num_blocks``; "none" -> []; else a comma list
    of reference names or bare family names (taken at the matching depth)."""
    depth = nearest_depth(num_blocks)
    if spec is None or spec.strip() == "":
        return [f"{fam}{depth}" for fam in REFERENCE_FAMILIES]
    if spec.strip().lower() == "none":
        return []
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in REFERENCE_FAMILIES:
            names.append(f"{item}{depth}")
        elif is_model(item):
            names.append(item)
        else:
            raise SppError(f"unknown reference {item!r}{close_matches(item, [*REFERENCE_FAMILIES])}; use a family "
                           f"({', '.join(REFERENCE_FAMILIES)}), a name from `spp models`, or none")
    return names


def reference_config(cfg: RunConfig, name: str) -> RunConfig:
    """The user's input settings, a reference model; width and in_chans follow a built-in user model's, and BN
    references are always taken in train mode (in eval mode an initialised BN is an identity)."""
    base, options = split_options(cfg.model)
    given = {**cfg.model_kwargs, **options}
    kwargs = {k: v for k, v in given.items() if k in ("width", "in_chans")} if is_model(base) else {}
    entry = get_entry(name)
    return RunConfig(
        model=name, model_kwargs=kwargs, input=cfg.input, input_std=cfg.input_std, num_samples=cfg.num_samples,
        batch_size=cfg.batch_size, resolution=cfg.resolution, in_chans=cfg.in_chans, seed=cfg.seed, mode="train",
        device=cfg.device, dtype=cfg.dtype, label=f"{entry.family.description} {entry.depth}",
    )


def is_same_run(cfg: RunConfig, ref: RunConfig) -> bool:
    """True when recording ``ref`` would repeat ``cfg`` exactly (the user's model is that reference)."""
    return replace(cfg, label=None) == replace(ref, label=None)


def record_reference(cfg: RunConfig, name: str, *, progress: Progress | None = None,
                     use_cache: bool = True) -> Record:
    """Record reference ``name`` on ``cfg``'s inputs (``use_cache``: read/write the on-disk curve cache)."""
    from spp.cache import cached_record

    entry = get_entry(name)
    ref_cfg = reference_config(cfg, name)

    def run() -> Record:
        rec = record_model(ref_cfg, progress=progress)
        rec.settings.update({"family": entry.family.prefix, "depth": entry.depth, "reference": True})
        return rec

    return cached_record(ref_cfg, run, use_cache=use_cache)

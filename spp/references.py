"""The reference SPPs drawn behind a user's model: BN-ReLU-Conv, ReLU-BN-Conv and NF-ResNet at a matching depth,
recorded on exactly the model's inputs (from the curve cache when they were recorded before)."""

from __future__ import annotations

from dataclasses import replace

from spp.errors import SppError, close_matches
from spp.loading import split_options
from spp.models import REFERENCE_FAMILIES, get_entry, is_model, nearest_depth
from spp.records import Record
from spp.run import Progress, RunConfig, record_cached


def reference_names(spec: str | None, num_blocks: int) -> list[str]:
    """``None``/"" -> the three families at the depth closest to ``num_blocks``; "none" -> []; else a comma list
    of reference names or bare family names (taken at the matching depth)."""
    depth = nearest_depth(num_blocks)
    if spec is None or spec.strip() == "" or spec.strip().lower() == "auto":
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
    references are always taken in train mode (in eval mode an initialised BN is an identity). With ``--grad`` the
    references get their gradient statistics too, for the same loss."""
    base, options = split_options(cfg.model)
    given = {**cfg.model_kwargs, **options}
    kwargs = {k: v for k, v in given.items() if k in ("width", "in_chans")} if is_model(base) else {}
    entry = get_entry(name)
    return RunConfig(
        model=name, model_kwargs=kwargs, input=cfg.input, input_std=cfg.input_std, num_samples=cfg.num_samples,
        batch_size=cfg.batch_size, resolution=cfg.resolution, in_chans=cfg.in_chans, seed=cfg.seed, mode="train",
        device=cfg.device, dtype=cfg.dtype, label=f"{entry.family.description} {entry.depth}", grad=cfg.grad,
        loss=cfg.loss,
    )


def is_same_run(cfg: RunConfig, ref: RunConfig) -> bool:
    """True when recording ``ref`` would repeat ``cfg`` exactly (the user's model is that reference)."""
    return replace(cfg, label=None) == replace(ref, label=None)


def record_reference(cfg: RunConfig, name: str, *, progress: Progress | None = None,
                     use_cache: bool = True) -> Record:
    """Record reference ``name`` on ``cfg``'s inputs (``use_cache``: read/write the on-disk curve cache)."""
    entry = get_entry(name)
    rec = record_cached(reference_config(cfg, name), progress=progress, use_cache=use_cache)
    rec.settings.update({"family": entry.family.prefix, "depth": entry.depth, "reference": True})
    return rec


def run_of(rec: Record) -> RunConfig:
    """The RunConfig ``rec`` was recorded with: exactly, from ``settings["run"]``, for records spp made; for
    others (a record of ``spp.hooks.record``, a plain table) the defaults with what its settings say of the input
    (Gaussian at its resolution, its sample and micro-batch counts, its seed)."""
    s = rec.settings
    run = s.get("run")
    if isinstance(run, dict) and run.get("model"):
        return RunConfig.from_settings(run)
    shape = s.get("input_shape") or []
    gaussian = s.get("input") in (None, "gaussian")
    return RunConfig(
        model=str(s.get("model_spec") or s.get("model") or "model"),
        input_std=float(s["input_std"]) if gaussian and isinstance(s.get("input_std"), (int, float)) else 1.0,
        num_samples=s.get("num_samples") if isinstance(s.get("num_samples"), int) else None,
        batch_size=int(s.get("batch_size") or 8),
        resolution=int(shape[-1]) if len(shape) == 3 else None,
        in_chans=int(shape[0]) if len(shape) == 3 else None,
        seed=int(s.get("seed") or 0),
        grad=s.get("grad") is True,
        loss=str(s["loss"]) if s.get("loss") in ("random", "xent") else "random",
    )


def references_for(rec: Record, spec: str | None = None, *, progress: Progress | None = None,
                   use_cache: bool = True) -> list[Record]:
    """The references of ``spec`` (as ``reference_names``) for ``rec``, on ``rec``'s own inputs; a reference that
    is the very run of ``rec`` is left out (it would be drawn twice)."""
    cfg = run_of(rec)
    refs = []
    for name in reference_names(spec, rec.num_blocks):
        if is_same_run(cfg, reference_config(cfg, name)):
            continue
        refs.append(record_reference(cfg, name, progress=progress, use_cache=use_cache))
    return refs

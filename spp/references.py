"""The reference SPPs drawn behind a user's model, recorded on exactly the model's inputs.

Which references (``reference_plan``): the kind follows the record's input. Image inputs (samples of shape
(C, H, W), H and W at least 32) get the three ResNet families (BN-ReLU-Conv, ReLU-BN-Conv, NF-ResNet) at the depth
whose block count is closest to the model's; token or embedding inputs (``settings["input"]`` "tokens" or
"embeddings") get the three transformer families (Pre-LN, Post-LN, NF) at the number of layers closest to the
model's (distinct ``layer`` values after the stem: a layer with an attention and an MLP branch counts once). Any
other input has no comparable reference: none is drawn, and the plan says why in one line.

On which inputs (``reference_config``): the record's own run, with what the run resolved filled in: the
resolution and channels the model actually got (a timm model's own 224 px, not the default 128), the samples it
actually used, the micro-batch size, seed, input file or Gaussian std, device and dtype; token references get the
model's sequence length (``seq_len``) and embedding references its width. References with BatchNorm are recorded in
train mode whatever the model's mode (at init an eval-mode BatchNorm is an identity: its buffers are 0 and 1), and
``spp.render`` says "train mode" in the legend when that differs from the model's; the others take the model's mode.
The CLI (``spp plot``) and a notebook (``spp.plot(rec, references="auto")``) both go through ``references_for``, so
they share the curve cache's entries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from spp.errors import SppError, close_matches
from spp.loading import split_options
from spp.models import get_entry, is_model, nearest_depth, reference_families
from spp.records import Record
from spp.run import MIN_RESOLUTION, Progress, RunConfig, record_cached

TOKEN_INPUTS = ("tokens", "embeddings")
BN_FAMILIES = ("bn_relu_resnet", "relu_bn_resnet")


@dataclass(frozen=True)
class ReferencePlan:
    """The references to draw for a record: ``names`` (registered models), their ``kind`` ("resnet" or
    "transformer", None when nothing fits) and ``note``: one line when none is drawn although none was asked
    for (why), else ""."""

    names: list[str]
    kind: str | None
    note: str = ""


def reference_kind(rec: Record) -> tuple[str | None, str]:
    """("resnet" | "transformer" | None, why not) from the record's input settings."""
    s = rec.settings
    kind = _setting(rec, "input")
    if kind in TOKEN_INPUTS:
        return "transformer", ""
    shape = s.get("input_shape")
    if shape is None and kind in (None, "gaussian"):
        return "resnet", ""  # a record without input settings: the default Gaussian image input
    if not isinstance(shape, list) or len(shape) != 3:
        return None, (f"no reference drawn: the references are image ResNets (samples (C, H, W)) and token "
                      f"transformers (--input tokens or embeddings), and this input's samples have shape "
                      f"{tuple(shape) if isinstance(shape, list) else '?'}")
    if min(int(shape[1]), int(shape[2])) < MIN_RESOLUTION:
        return None, (f"no reference drawn: the reference ResNets downsample by 32 and the input is "
                      f"{shape[1]}x{shape[2]}; use --resolution {MIN_RESOLUTION} or more to see them")
    return "resnet", ""


def model_layers(rec: Record) -> int:
    """The model's depth in layers: distinct ``layer`` values after the stem (two branches of a layer: one)."""
    return len({int(r.get("layer", r["block"])) for r in rec.rows if int(r.get("layer", r["block"])) > 0})


def reference_names(spec: str | None, depth_of: int, kind: str = "resnet") -> list[str]:
    """``None``/""/"auto" -> the kind's families at the depth closest to ``depth_of`` (blocks for ResNets, layers
    for transformers); "none" -> []; else a comma list of reference names or bare family names (taken at the
    matching depth)."""
    families = reference_families(kind)
    depth = nearest_depth(depth_of, kind)
    if spec is None or spec.strip() == "" or spec.strip().lower() == "auto":
        return [f"{fam}{depth}" for fam in families]
    if spec.strip().lower() == "none":
        return []
    names = []
    transformers = reference_families("transformer")
    every = reference_families("resnet") + transformers
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in every:
            names.append(f"{item}{nearest_depth(depth_of, 'transformer' if item in transformers else 'resnet')}")
        elif is_model(item):
            names.append(item)
        else:
            raise SppError(f"unknown reference {item!r}{close_matches(item, every)}; use a family "
                           f"({', '.join(families)}), a name from `spp models`, or none")
    return names


def check_reference_spec(spec: str | None) -> None:
    """Fail on an unknown name in ``--reference`` before anything is recorded (depths are chosen later)."""
    if spec is None or spec.strip().lower() in ("", "auto", "none"):
        return
    reference_names(spec, 16, "resnet")


def reference_plan(rec: Record, spec: str | None = None) -> ReferencePlan:
    """Which references ``rec`` gets for ``spec`` (as ``spp plot --reference``): see the module docstring."""
    asked = spec is not None and spec.strip().lower() not in ("", "auto")
    kind, why = reference_kind(rec)
    if spec is not None and spec.strip().lower() == "none":
        return ReferencePlan([], kind)
    if kind is None:
        if asked:
            raise SppError(why.replace("no reference drawn", "--reference cannot be drawn"))
        return ReferencePlan([], None, why)
    depth_of = model_layers(rec) if kind == "transformer" else rec.num_blocks
    names = reference_names(spec, depth_of, kind)
    other = [n for n in names if get_entry(n).family.kind != kind]
    if other:
        raise SppError(f"--reference {', '.join(other)}: a {get_entry(other[0]).family.kind} reference cannot take "
                       f"this model's input ({'token' if kind == 'transformer' else 'image'} samples)")
    return ReferencePlan(names, kind)


def has_batchnorm(name: str, kwargs: dict[str, Any] | None = None) -> bool:
    """True when reference ``name`` (with ``kwargs``) normalises with BatchNorm: it is then recorded in train mode."""
    entry = get_entry(name)
    return entry.family.prefix in BN_FAMILIES and (kwargs or {}).get("norm", "bn") == "bn"


def resolved_run(rec: Record) -> RunConfig:
    """The RunConfig of ``rec`` with what its run resolved made explicit: resolution, input channels and samples
    used (from its settings), built-in options moved out of the spec into ``model_kwargs``, no label. Two records
    of the same computation give equal resolved runs, whichever defaults their commands left open."""
    cfg = run_of(rec)
    s = rec.settings
    shape = s.get("input_shape")
    changes: dict[str, Any] = {"label": None}
    if isinstance(s.get("resolution"), int) and isinstance(shape, list) and len(shape) == 3:
        changes["resolution"] = int(s["resolution"])
        changes["in_chans"] = int(shape[0])
    if isinstance(s.get("num_samples"), int) and not isinstance(s.get("num_samples"), bool):
        changes["num_samples"] = int(s["num_samples"])
    base, options = split_options(cfg.model)
    if options and is_model(base):
        changes["model"], changes["model_kwargs"] = base, {**cfg.model_kwargs, **options}
    kwargs = changes.get("model_kwargs", cfg.model_kwargs)
    seq_len = sequence_length(rec)
    if is_model(base) and get_entry(base).family.kind == "transformer":  # the options it was built with
        built = {"seq_len": seq_len, "vocab_size": _setting(rec, "vocab_size") if s.get("input") == "tokens" else None}
        kwargs = {**kwargs, **{k: v for k, v in built.items() if k not in kwargs and isinstance(v, int)}}
        changes["model"], changes["model_kwargs"] = base, kwargs
    return replace(cfg, **changes)


def _as_record(source: Record | RunConfig) -> Record:
    """A Record, or a RunConfig seen as the record it would make (its settings hold only the run)."""
    if isinstance(source, RunConfig):
        return Record(rows=[], stage_ends=[], settings={"run": source.describe()})
    return source


def reference_config(source: Record | RunConfig, name: str) -> RunConfig:
    """The RunConfig that records reference ``name`` on exactly the inputs of ``source`` (a Record, whose settings
    say what its run resolved; or a RunConfig, taken as it is): see the module docstring."""
    rec = _as_record(source)
    run = resolved_run(rec)
    entry = get_entry(name)
    kwargs: dict[str, Any] = {}
    user_builtin = is_model(run.model)
    if entry.family.kind == "resnet":
        if user_builtin and get_entry(run.model).family.kind == "resnet" and "width" in run.model_kwargs:
            kwargs["width"] = run.model_kwargs["width"]
        if run.in_chans is not None and run.in_chans != 3:
            kwargs["in_chans"] = run.in_chans
    else:
        if user_builtin and get_entry(run.model).family.kind == "transformer" and "width" in run.model_kwargs:
            kwargs["width"] = run.model_kwargs["width"]
        seq_len = sequence_length(rec)
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        vocab = _setting(rec, "vocab_size")
        if rec.settings.get("input") == "tokens" and isinstance(vocab, int) and not isinstance(vocab, bool):
            kwargs["vocab_size"] = vocab  # the very token ids the model got
        shape = rec.settings.get("input_shape")
        if rec.settings.get("input") == "embeddings" and isinstance(shape, list) and shape:
            kwargs["width"] = int(shape[-1])
    mode = "train" if has_batchnorm(name, kwargs) else run.mode
    return replace(run.with_model(name, **kwargs), mode=mode, stochastic=False,
                   label=f"{entry.family.description} {entry.depth}")


def _setting(rec: Record, key: str) -> Any:
    """``key`` from the record's settings, else from its run's."""
    s = rec.settings
    run = s.get("run")
    if s.get(key) is not None:
        return s[key]
    return run.get(key) if isinstance(run, dict) else None


def sequence_length(rec: Record) -> int | None:
    """The token model's sequence length: its run's ``seq_len``, else the length of its samples' shape."""
    value = _setting(rec, "seq_len")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    shape = rec.settings.get("input_shape")
    if isinstance(shape, list) and shape:
        return int(shape[0])
    return None


def is_same_run(user: RunConfig, ref: RunConfig) -> bool:
    """True when recording ``ref`` would repeat ``user`` exactly (the user's model is that reference)."""
    return replace(user, label=None) == replace(ref, label=None)


def record_reference(source: Record | RunConfig, name: str, *, progress: Progress | None = None,
                     use_cache: bool = True) -> Record:
    """Record reference ``name`` on the inputs of ``source`` (a Record or a RunConfig, as ``reference_config``;
    ``use_cache``: read/write the on-disk curve cache)."""
    entry = get_entry(name)
    ref = record_cached(reference_config(source, name), progress=progress, use_cache=use_cache)
    ref.settings.update({"family": entry.family.prefix, "depth": entry.depth, "reference": True})
    return ref


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
        mode=str(s.get("mode")) if s.get("mode") in ("train", "eval") else "train",
        grad=s.get("grad") is True,
        loss=str(s["loss"]) if s.get("loss") in ("random", "xent") else "random",
    )


def references_for(rec: Record, spec: str | None = None, *, progress: Progress | None = None,
                   use_cache: bool = True, notes: list[str] | None = None) -> list[Record]:
    """The references of ``spec`` (``reference_plan``) for ``rec``, on ``rec``'s own inputs; a reference that is
    the very run of ``rec`` is left out (it would be drawn twice). ``notes`` gets the plan's one line, if any."""
    plan = reference_plan(rec, spec)
    if plan.note and notes is not None:
        notes.append(plan.note)
    user = resolved_run(rec)
    refs = []
    for name in plan.names:
        if is_same_run(user, reference_config(rec, name)):
            continue
        refs.append(record_reference(rec, name, progress=progress, use_cache=use_cache))
    return refs

"""What a record is called in legends, titles, summaries and comparison tables: the run, not just the model name.

A label is the model as the user named it plus every option that changed it: ``nf_resnet600 (ws=False)`` for
``--model nf_resnet600 --no-ws`` and for ``'nf_resnet600?ws=false'`` alike, ``resnet50 (checkpoint=ft.pt)`` for a
model with weights loaded on top. ``--label`` (``RunConfig.label``) overrides it. Two records shown together never
share a label silently: ``distinct_labels`` adds the run setting that tells them apart, and numbers them only when
nothing does. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

# Run settings that tell two records of one model apart, in the order they are worth mentioning.
DISTINGUISHING = ("mode", "seed", "resolution", "input", "num_samples", "batch_size", "input_std", "dtype",
                  "stochastic")


def option_text(value: Any) -> str:
    """An option's value as a label shows it: strings bare, everything else as Python writes it (False, 0.25)."""
    return value if isinstance(value, str) else repr(value)


def spec_name(spec: str) -> str:
    """The model part of a ``--model`` spec without its ``?options``; files shortened to their base name
    (``path/to/net.py:make`` -> ``net.py:make``), so a label stays readable."""
    base = spec.split("?", 1)[0].strip() if "?" in spec and not os.path.exists(spec) else spec.strip()
    path, sep, factory = base.rpartition(":")
    if sep and path.endswith(".py"):
        return f"{os.path.basename(path)}:{factory}"
    if os.sep in base or base.endswith((".pt", ".pth", ".pt2", ".ts")):
        return os.path.basename(base)
    return base


def run_label(spec: str, options: Mapping[str, Any] | None = None, *, pretrained: bool = False,
              checkpoint: str | None = None) -> str:
    """``spec`` with its options: ``run_label("nf_resnet600?ws=false")`` -> ``nf_resnet600 (ws=False)``.

    ``options``: the model keyword arguments given besides the spec (``--width``, ``--model-kwargs``); options
    after ``?`` in the spec win over them, as in ``spp.loading.load_model``.
    """
    from spp.loading import split_options

    _, inline = split_options(spec.strip()) if spec.strip() else ("", {})
    merged = {**dict(options or {}), **inline}
    parts = [f"{k}={option_text(v)}" for k, v in merged.items()]
    if pretrained:
        parts.append("pretrained")
    if checkpoint:
        parts.append(f"checkpoint={os.path.basename(str(checkpoint))}")
    name = spec_name(spec) or "model"
    return f"{name} ({', '.join(parts)})" if parts else name


def config_label(cfg: Any, fallback: str | None = None) -> str:
    """The label of a ``spp.run.RunConfig``: its ``label`` if given, else ``run_label`` of its spec and options."""
    if getattr(cfg, "label", None):
        return str(cfg.label)
    return run_label(cfg.model or fallback or "model", cfg.model_kwargs, pretrained=bool(cfg.pretrained),
                     checkpoint=cfg.checkpoint)


def _setting(settings: Mapping[str, Any], key: str) -> Any:
    run = settings.get("run")
    if key in settings:
        return settings[key]
    return run.get(key) if isinstance(run, Mapping) else None


def distinct_labels(labels: Sequence[str], settings: Sequence[Mapping[str, Any]] = ()) -> tuple[list[str], list[str]]:
    """Labels made unique, and one note per change made.

    Records that share a label get the first run setting (``DISTINGUISHING``) on which they differ appended,
    ``nf_resnet50 [mode=eval]``; where no setting tells them apart (the same run twice) they are numbered,
    ``a``, ``a #2``, and the note says so.
    """
    out = list(labels)
    notes: list[str] = []
    settings = list(settings) or [{} for _ in out]
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(out):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        for key in DISTINGUISHING:
            values = [_setting(settings[i], key) for i in members]
            if len({repr(v) for v in values}) == len(members):
                for i, v in zip(members, values, strict=True):
                    out[i] = f"{label} [{key}={option_text(v) if v is not None else '?'}]"
                notes.append(f"{len(members)} records are called {label!r}: told apart by {key}")
                break
        else:
            for n, i in enumerate(members[1:], start=2):
                out[i] = f"{label} #{n}"
            notes.append(f"{len(members)} records are called {label!r} and no run setting tells them apart: "
                         f"numbered {label!r}, {label + ' #2'!r}...; pass --label to name them")
    # a numbered or suffixed label may collide with an original one: number what still repeats
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            out[i] = f"{label} #{seen[label]}"
    return out, notes

"""Model specs -> nn.Modules: the one resolver behind ``--model``, shared by the CLI and notebooks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from spp.errors import SppError


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module
    name: str  # what to call it in plots and records
    source: str  # "spp", "timm", "torchvision", "file", "torchscript", "pickle", ...
    spec: str  # what the user asked for
    data_config: dict[str, Any] = field(default_factory=dict)  # input size / mean / std, where the model has one


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs`` JSON -> dict, with a one-line error."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SppError(f"--model-kwargs is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise SppError("--model-kwargs must be a JSON object, e.g. '{\"width\": 0.25}'")
    return value


def load_model(
    spec: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Resolve ``spec`` (a built-in reference name, ...) to a randomly initialised model."""
    from spp.models import create_model, is_model

    kwargs = dict(model_kwargs or {})
    if is_model(spec):
        return LoadedModel(create_model(spec, **kwargs), spec, "spp", spec)
    from spp.models import get_entry

    get_entry(spec)  # raises the unknown-name error with close matches
    raise AssertionError("unreachable")

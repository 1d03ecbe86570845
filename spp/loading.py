"""Model specs -> nn.Modules: the one resolver behind ``--model``, shared by the CLI and notebooks.

A spec is, in the order tried:

* ``hf:SPEC``: a HuggingFace transformers model (``spp.hf``: a model type built from its config, a folder, a hub
  id), recorded on token inputs;
* ``timm:NAME`` / ``torchvision:NAME`` / ``spp:NAME``: that library's model, randomly initialised;
* ``FILE.py:FACTORY``: the file imported as a module, ``FACTORY(**model_kwargs)`` must return an nn.Module;
* an existing file: a torch.export archive (``.pt2``), a TorchScript archive, or a pickled whole module (only
  with ``trust_pickle``: unpickling runs code); a file that holds only weights points to ``--checkpoint``;
* a built-in reference name (``spp models``), then a timm name, then a torchvision name.

``checkpoint`` loads a state_dict on top of any of them, always with ``weights_only=True``. Importing this
module imports neither torch nor timm nor torchvision: they load when a model is resolved.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

from spp.errors import SppError, close_matches, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What an ImageNet model without its own data config gets: no input_size, so the caller picks the resolution.
IMAGENET_CONFIG: dict[str, Any] = {
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
}
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")  # tried in this order
PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module
    name: str  # what to call it in plots and records
    source: str  # "spp", "timm", "torchvision", "file", "torchscript", "export", "pickle"
    spec: str  # what the user asked for
    data_config: dict[str, Any] = field(default_factory=dict)  # mean / std (/ input_size where known)
    checkpoint: str | None = None  # the state_dict file loaded on top, if any
    # For models that read token ids (HF models, the reference transformers): vocab_size, hidden_size,
    # max_positions, is_encoder_decoder, tokenizer, seq_len (a length the model requires); None for image models.
    tokens: dict[str, Any] | None = None

    @property
    def takes_tokens(self) -> bool:
        return self.tokens is not None


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




# ---- libraries ---------------------------------------------------------------------------------------------


def _timm_is_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def _timm_data_config(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's own preprocessing for the model, with input_size corrected for img_size / in_chans kwargs."""
    import timm.data

    config = dict(timm.data.resolve_data_config({}, model=model))
    size = config.get("input_size") or (3, 224, 224)
    chans = int(kwargs.get("in_chans", size[0]))
    img = kwargs.get("img_size")
    if img is not None:  # the pretrained config keeps its 224 even when the model was built smaller
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        size = (chans, int(h), int(w))
    config["input_size"] = (chans, int(size[1]), int(size[2]))
    return config


def _call(label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        raise SppError(f"bad option for {label}: {one_line(exc)}") from None


def _load_timm(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise SppError(f"unknown timm model {name!r}{close_matches(name, timm.list_models())}")
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except TypeError as exc:
            raise SppError(f"bad option for {name}: {one_line(exc)}") from None
        except Exception as exc:  # network, hub, missing file: all say the same to the user
            raise SppError(
                f"could not fetch pretrained weights for {name}: {one_line(exc)}; "
                "run without --pretrained or pass --checkpoint"
            ) from None
    else:
        model = _call(name, timm.create_model, name, pretrained=False, **kwargs)
    return LoadedModel(model, name, "timm", spec, _timm_data_config(model, kwargs))


def _load_torchvision(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise SppError(f"unknown torchvision model {name!r}{close_matches(name, names)}")
    if pretrained:
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        except TypeError as exc:
            raise SppError(f"bad option for {name}: {one_line(exc)}") from None
        except Exception as exc:
            raise SppError(
                f"could not fetch pretrained weights for {name}: {one_line(exc)}; "
                "run without --pretrained or pass --checkpoint"
            ) from None
    else:
        model = _call(name, torchvision.models.get_model, name, weights=None, **kwargs)
    return LoadedModel(model, name, "torchvision", spec, dict(IMAGENET_CONFIG))


def _load_spp(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    from spp.models import create_model, get_entry

    entry = get_entry(name)  # the unknown-name error, with close matches
    if pretrained:
        raise SppError(f"{name} is a built-in reference model without pretrained weights; drop --pretrained")
    model = create_model(name, **kwargs)
    if entry.family.kind != "transformer":
        return LoadedModel(model, name, "spp", spec, dict(IMAGENET_CONFIG))
    tokens = {"vocab_size": int(model.vocab_size), "hidden_size": int(model.width), "max_positions": None,
              "is_encoder_decoder": False, "tokenizer": None, "seq_len": int(model.seq_len)}
    return LoadedModel(model, name, "spp", spec, {}, tokens=tokens)


def _load_hf(spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    from spp.hf import load_hf

    model, name, info = load_hf(spec, model_kwargs=kwargs, pretrained=pretrained)
    tokens = {"vocab_size": info.vocab_size, "hidden_size": info.hidden_size, "max_positions": info.max_positions,
              "is_encoder_decoder": info.is_encoder_decoder, "tokenizer": info.tokenizer, "seq_len": None,
              "hf": info.as_dict()}
    return LoadedModel(model, name, "hf", f"hf:{spec}", {}, tokens=tokens)


# ---- files -------------------------------------------------------------------------------------------------


def _split_factory(spec: str) -> tuple[str, str] | None:
    """``path/to/file.py:factory`` -> (path, factory); None when ``spec`` is not of that form."""
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and factory.isidentifier():
        return path, factory
    return None


def _load_factory(path: str, factory: str, spec: str, kwargs: dict[str, Any]) -> LoadedModel:
    import importlib.util
    import inspect
    import sys

    from torch import nn

    if not os.path.isfile(path):
        raise SppError(f"model file {path} does not exist")
    mod_name = f"spp_user_model_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SppError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except SppError:
        raise
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise SppError(f"importing {path} failed: {one_line(exc)}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        own = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == mod_name
            and (inspect.isfunction(v) or (inspect.isclass(v) and issubclass(v, nn.Module)))
        )
        listed = ", ".join(own) if own else "none"
        hint = close_matches(factory, own)
        raise SppError(f"{path} has no factory {factory!r}{hint}; it defines: {listed}")
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise SppError(f"bad option for {path}:{factory}: {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SppError(f"{path}:{factory} returned {type(model).__name__}, not a torch.nn.Module")
    return LoadedModel(model, factory, "file", spec, dict(IMAGENET_CONFIG))


def _archive_kind(path: str) -> str:
    """'export', 'torchscript', 'torch.save' (zip archives) or 'legacy' (pre-1.6 torch.save, or not torch)."""
    if not zipfile.is_zipfile(path):
        return "legacy"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "torch.save"


def _load_file(path: str, spec: str, trust_pickle: bool) -> LoadedModel:
    import warnings

    import torch
    from torch import nn

    stem = os.path.splitext(os.path.basename(path))[0]
    kind = _archive_kind(path)
    if kind == "export" or path.endswith(".pt2"):
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise SppError(f"cannot load {path} as a torch.export program: {one_line(exc)}") from None
        model: nn.Module
        try:  # unflatten keeps the module hierarchy, so blocks can be hooked; .module() is one flat graph
            model = torch.export.unflatten(program)
        except Exception:
            model = program.module()
        return LoadedModel(model, stem, "export", spec, dict(IMAGENET_CONFIG))
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as exc:
            raise SppError(f"cannot load {path} as TorchScript: {one_line(exc)}") from None
        return LoadedModel(model, stem, "torchscript", spec, dict(IMAGENET_CONFIG))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _refused_by_weights_only(exc):
            raise SppError(f"cannot read {path}: {one_line(exc)}") from None
        obj = None  # a pickled object: only unpickled below, with the user's say-so
    if obj is not None:
        if isinstance(obj, dict):
            raise SppError(
                f"{path} holds weights, not a model; name the architecture with --model "
                "and pass this file as --checkpoint"
            )
        raise SppError(f"{path} holds a {type(obj).__name__}, not a model")
    if not trust_pickle:
        raise SppError(
            f"{path} is a pickled Python object (a whole module?) and unpickling it can run "
            "arbitrary code; pass --trust-pickle only if you trust the file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SppError(f"cannot unpickle {path}: {one_line(exc)}") from None
    if not isinstance(obj, nn.Module):
        raise SppError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj, stem, "pickle", spec, dict(IMAGENET_CONFIG))


def _refused_by_weights_only(exc: BaseException) -> bool:
    """torch.load(weights_only=True) met a pickled object it will not build (not a corrupt file)."""
    return "weights only load failed" in str(exc).lower()


# ---- checkpoints -------------------------------------------------------------------------------------------


def _extract_state_dict(obj: Any, path: str) -> dict[str, Any]:
    import torch

    def is_state_dict(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if is_state_dict(obj.get(key)):
                return dict(obj[key])
        if is_state_dict(obj):
            return dict(obj)
        keys = ", ".join(map(str, list(obj)[:6]))
        raise SppError(f"checkpoint {path} has no state_dict: top-level keys are {keys or 'none'}")
    raise SppError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")


def _strip_prefixes(state: dict[str, Any], model_keys: set[str]) -> dict[str, Any]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k in model_keys for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_checkpoint(model: Any, path: str, *, trust_pickle: bool = False) -> None:
    """Load the state_dict in ``path`` into ``model`` (strictly), with one-line errors for every mismatch."""
    import torch

    if not os.path.isfile(path):
        raise SppError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _refused_by_weights_only(exc):
            raise SppError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
        if not trust_pickle:
            raise SppError(
                f"checkpoint {path} holds pickled Python objects besides tensors; spp reads checkpoints with "
                "weights_only=True; pass --trust-pickle only if you trust the file"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    expected = model.state_dict()
    state = _strip_prefixes(_extract_state_dict(obj, path), set(expected))
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        raise SppError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise SppError(
            f"checkpoint {path} does not match the model: {len(wrong)} tensors differ in shape "
            f"(checkpoint vs model: {_names(wrong, 2)})"
        )
    try:
        model.load_state_dict(state, strict=False)  # keys checked above; old BN lacks num_batches_tracked
    except RuntimeError as exc:
        raise SppError(f"checkpoint {path} does not load: {one_line(exc)}") from None


# ---- the resolver ------------------------------------------------------------------------------------------


def _unknown(spec: str) -> SppError:
    from spp.models import list_models

    candidates = list(list_models())
    try:
        import timm

        candidates += timm.list_models()
    except ImportError:
        pass
    candidates += _torchvision_names()
    hint = close_matches(spec, dict.fromkeys(candidates))
    return SppError(
        f"unknown model {spec!r}{hint}; give a built-in name (`spp models`), a timm or torchvision name, "
        "FILE.py:FACTORY, or a .pt2 / TorchScript file"
    )


def _resolve(spec: str, kwargs: dict[str, Any], pretrained: bool, trust_pickle: bool) -> LoadedModel:
    from spp.models import is_model

    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("timm", "torchvision", "tv", "spp") and rest:
        if prefix == "timm":
            return _load_timm(rest, spec, kwargs, pretrained)
        if prefix in ("torchvision", "tv"):
            return _load_torchvision(rest, spec, kwargs, pretrained)
        return _load_spp(rest, spec, kwargs, pretrained)
    factory = _split_factory(spec)
    if factory is not None:
        return _load_factory(*factory, spec, kwargs)
    if spec.endswith(".py"):
        raise SppError(f"name the factory to call: {spec}:FUNCTION (it must return an nn.Module)")
    if is_model(spec):
        return _load_spp(spec, spec, kwargs, pretrained)
    if os.path.isfile(spec):
        if kwargs:
            raise SppError(f"--model-kwargs do not apply to a saved model ({spec})")
        if pretrained:
            raise SppError(f"--pretrained does not apply to a saved model ({spec}); use --checkpoint")
        return _load_file(spec, spec, trust_pickle)
    if os.sep in spec or spec.endswith((".pt", ".pth", ".pt2", ".ts", ".bin", ".safetensors")):
        raise SppError(f"model file {spec} does not exist")
    if _timm_is_model(spec):
        return _load_timm(spec, spec, kwargs, pretrained)
    if spec in _torchvision_names():
        return _load_torchvision(spec, spec, kwargs, pretrained)
    raise _unknown(spec)


def split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'nf_resnet600?ws=false,alpha=0.3' -> ('nf_resnet600', {'ws': False, 'alpha': 0.3}).

    Options after '?' let one command hold two variants of a model (``spp compare nf_resnet600
    'nf_resnet600?ws=false'``). Values are JSON where they parse (numbers, true/false/null), else strings.
    """
    name, sep, query = spec.partition("?")
    if not sep or os.path.exists(spec):
        return spec, {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in query.split(","))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SppError(f"model options in {spec!r} must read KEY=VALUE[,KEY=VALUE...], not {item!r}")
        try:
            value = json.loads(text.strip().lower() if text.strip().lower() in ("true", "false", "null") else text)
        except json.JSONDecodeError:
            value = text.strip()
        options[key.strip()] = value
    return name, options


def load_model(
    spec: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Resolve ``spec`` (see the module docstring) to a model on the CPU, randomly initialised unless
    ``pretrained`` (timm / torchvision weights) or ``checkpoint`` (a state_dict file) say otherwise."""
    if not spec or not spec.strip():
        raise SppError("--model is empty")
    if spec.strip().startswith("hf:"):  # its options are parsed strictly against the model's config
        loaded = _load_hf(spec.strip()[3:], dict(model_kwargs or {}), pretrained)
        if checkpoint:
            load_checkpoint(loaded.model, checkpoint, trust_pickle=trust_pickle)
            loaded.checkpoint = checkpoint
        return loaded
    name, options = split_options(spec.strip())
    loaded = _resolve(name, {**(model_kwargs or {}), **options}, pretrained, trust_pickle)
    if options:
        loaded.name, loaded.spec = spec.strip(), spec.strip()
    if checkpoint:
        load_checkpoint(loaded.model, checkpoint, trust_pickle=trust_pickle)
        loaded.checkpoint = checkpoint
    return loaded

"""HuggingFace transformers models for spp: ``hf:SPEC`` built offline, read from a folder, or fetched from the hub.

``SPEC`` is, in the order tried:

* a model type (``llama``, ``gpt2``, ``t5``, ... any ``transformers`` config name), built from its default
  config, randomly initialised, never touching the network: ``hf:llama?num_hidden_layers=8,hidden_size=256``;
* a local folder holding ``config.json`` (a ``save_pretrained`` folder, a hub snapshot): the architecture from
  its config, the weights (``--pretrained``) from its safetensors files, else from ``.bin`` files read with
  ``weights_only=True``; its tokenizer is used for text input when the folder holds one;
* a hub id (``org/name``): read from the local hub cache when there, else fetched (config only, or the weights with
  ``--pretrained``). Offline (``HF_HUB_OFFLINE=1``, or the hub unreachable within a second) this is a one-line
  error, not a minute of retries.

Options after ``?`` (or in ``model_kwargs``) override config fields; values are parsed strictly: integers, floats,
true/false, none, else strings. An unknown field is an error (a typo would otherwise be silently ignored). A few
options are spp's, not the config's:

* ``class=NAME``: which model class to build. Default: the base model (``AutoModel``: no LM head; the residual
  stream is the same). ``class=causal-lm`` / ``masked-lm`` / ``seq2seq-lm`` pick the task's Auto class;
  any transformers class name works too (``class=LlamaForCausalLM``).
* ``dtype=float32|bfloat16|float16``: parameter dtype (default float32; a checkpoint stored in bf16 is upcast).
* ``attn_implementation=eager|sdpa``: which attention kernel transformers runs.

Code from a model repository is never run (``trust_remote_code`` stays off): a config that needs it is refused.
transformers is imported only here, lazily; without it ``hf:`` says how to install it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from spp.errors import SppError, close_matches

INSTALL_HINT = "hf: models need HuggingFace transformers: pip install 'spp[hf]'"
SPP_OPTIONS = ("class", "dtype", "attn_implementation")
TASK_CLASSES = {
    "base": "AutoModel",
    "auto": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
CONNECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class HFInfo:
    """What spp needs to know about a transformers model to feed it and to describe it."""

    model_type: str
    model_class: str
    source: str  # "config" (random init from a model type), "folder", "hub"
    pretrained: bool
    vocab_size: int | None  # rows of the input embedding (what token ids must stay below)
    hidden_size: int | None
    num_layers: int | None
    max_positions: int | None  # None: no absolute position table (rotary, relative, ALiBi)
    is_encoder_decoder: bool
    main_input_name: str  # "input_ids" for text models
    tokenizer: str | None  # a folder or cached hub id whose tokenizer loads offline; None if there is none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SppError(INSTALL_HINT) from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers and the hub at error level, no progress bars, for the duration; restored afterwards."""
    import warnings

    transformers = _import_transformers()
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# ---- options -----------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """'8' -> 8, '1e-5' -> 1e-05, 'true' -> True, 'none' -> None, else the string (quotes stripped)."""
    raw = text.strip()
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+", raw):
        return float(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'llama?num_hidden_layers=8,hidden_size=256' -> ('llama', {'num_hidden_layers': 8, 'hidden_size': 256})."""
    base, sep, query = spec.partition("?")
    if not sep or os.path.isdir(os.path.expanduser(spec)):
        return spec.strip(), {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in query.split(","))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SppError(f"options in hf:{spec} must read KEY=VALUE[,KEY=VALUE...], not {item!r}")
        options[key.strip()] = parse_value(text)
    return base.strip(), options


# ---- resolving the model class -----------------------------------------------------------------------------


def _model_class(transformers: Any, name: str | None) -> Any:
    wanted = TASK_CLASSES.get((name or "base").lower(), name or "AutoModel")
    cls = getattr(transformers, wanted, None)
    if cls is None:
        candidates = [n for n in dir(transformers) if n.endswith(("Model", "LM", "Generation"))]
        raise SppError(
            f"hf: class={name!r} is no transformers model class{close_matches(wanted, candidates)}; "
            f"use causal-lm, masked-lm, seq2seq-lm or a class name such as LlamaForCausalLM"
        )
    if not hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
        raise SppError(f"hf: class={name!r} is not a model class (it has no from_config)")
    return cls


def _dtype(name: Any) -> Any:
    import torch

    if name is None:
        return torch.float32
    if str(name) not in DTYPES:
        raise SppError(f"hf: dtype={name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, str(name))


def _derived_fields(config: Any) -> set[str]:
    """Scalar fields the config's constructor reproduces on its own (derived from others, or at their default).

    A saved config stores every field, also those its constructor derives (LlamaConfig: ``head_dim = hidden_size //
    num_attention_heads``; T5Config: ``num_decoder_layers = num_layers``); they must be derived again when the
    fields they come from are overridden."""
    fields = config.to_dict()
    derived = set()
    for key, value in fields.items():
        if key in ("model_type", "transformers_version"):
            continue  # lists too: Qwen2's layer_types has one entry per layer, derived from num_hidden_layers
        try:
            rebuilt = type(config).from_dict({k: v for k, v in fields.items() if k != key})
            same = rebuilt.to_dict().get(key) == value
        except Exception:  # the constructor needs this field
            continue
        if same:
            derived.add(key)
    return derived


def _with_overrides(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """A new config: ``config`` with ``overrides``, rebuilt through the config's constructor.

    Through the constructor, not setattr, and without the fields the constructor derives (``_derived_fields``), so
    that ``hidden_size=64`` also changes ``head_dim``: setattr would silently keep the old head size. A field the
    config does not have is an error (a typo would otherwise be ignored), and so is a value the constructor changes.
    """
    if not overrides:
        return config
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key in overrides:
        if key not in known and not hasattr(config, key):
            hint = close_matches(key, sorted(known))
            raise SppError(f"hf:{where}: {type(config).__name__} has no field {key!r}{hint}")
    aliases = getattr(config, "attribute_map", {})
    wanted = {aliases.get(k, k): v for k, v in overrides.items()}
    derived = _derived_fields(config)
    kept = {k: v for k, v in config.to_dict().items() if k not in derived or k in wanted}
    try:
        rebuilt = type(config).from_dict({**kept, **wanted})
    except Exception as exc:  # TypeError, ValueError, huggingface_hub's strict-dataclass validation errors
        raise SppError(f"hf:{where}: the config rejects these options: {_one_line(exc)}") from None
    for key, value in overrides.items():
        now = getattr(rebuilt, key, None)
        if isinstance(value, (bool, int, float, str)) and now != value:
            raise SppError(f"hf:{where}: {type(config).__name__} turned {key}={value!r} into {now!r}")
    return rebuilt


def _first_attr(config: Any, *names: str) -> Any:
    for n in names:
        value = getattr(config, n, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _text_config(config: Any) -> Any:
    """Multimodal configs keep the language model's sizes in a sub-config."""
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:
        return config


def _max_positions(model: Any, text_config: Any) -> int | None:
    """Longest sequence the model's absolute position table holds; None without one (rotary, ALiBi, relative).

    Read off the table itself (an embedding named ``pos``/``wpe``), less RoBERTa-style padding offsets, and never
    above the config's own limit (OPT's table carries 2 extra rows)."""
    import torch

    limits = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe") and "relative" not in leaf:
            rows = int(module.num_embeddings)
            if module.padding_idx is not None:
                rows -= int(module.padding_idx) + 1
            limits.append(rows)
    if not limits:
        return None
    configured = _first_attr(text_config, "max_position_embeddings", "n_positions", "n_ctx", "max_positions")
    return min(limits + ([configured] if configured else []))


def _info(model: Any, config: Any, cls_name: str, source: str, pretrained: bool, tokenizer: str | None) -> HFInfo:
    text = _text_config(config)
    vocab = None
    try:
        embeddings = model.get_input_embeddings()
        vocab = int(embeddings.num_embeddings) if embeddings is not None else None
    except (AttributeError, NotImplementedError, TypeError):
        vocab = None
    if vocab is None:
        vocab = _first_attr(text, "vocab_size")
    return HFInfo(
        model_type=str(getattr(config, "model_type", "") or ""),
        model_class=cls_name,
        source=source,
        pretrained=pretrained,
        vocab_size=vocab,
        hidden_size=_first_attr(text, "hidden_size", "d_model", "n_embd", "dim"),
        num_layers=_first_attr(text, "num_hidden_layers", "num_layers", "n_layer", "n_layers"),
        max_positions=_max_positions(model, text),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        main_input_name=str(getattr(model, "main_input_name", "input_ids")),
        tokenizer=tokenizer,
    )


# ---- where the model comes from ----------------------------------------------------------------------------


def _is_model_type(spec: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return spec in CONFIG_MAPPING


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be reached now (offline mode set, or no TCP connection within a second); None if it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host} is unreachable ({type(exc).__name__})"


def _refuse_remote_code(config_dict: dict[str, Any], where: str) -> None:
    if config_dict.get("auto_map"):
        raise SppError(
            f"hf:{where} needs its own Python code from the model repository (trust_remote_code); "
            "spp never runs such code: use a model type transformers ships"
        )


def _build(transformers: Any, cls: Any, config: Any, options: dict[str, Any]) -> Any:
    import torch

    kwargs: dict[str, Any] = {"dtype": _dtype(options.get("dtype"))}
    if options.get("attn_implementation"):
        kwargs["attn_implementation"] = options["attn_implementation"]
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    try:
        model = build(config, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SppError(f"hf: cannot build {getattr(cls, '__name__', cls)} from this config: {_one_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise SppError(f"hf: {getattr(cls, '__name__', cls)} built a {type(model).__name__}, not a torch module")
    return model


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_hf(
    spec: str, *, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False
) -> tuple[Any, str, HFInfo]:
    """``hf:SPEC`` -> (model in eval mode on the CPU, a name for plots, HFInfo). See the module docstring.

    The caller seeds torch (``torch.manual_seed``) before calling: random initialisation draws from it.
    """
    transformers = _import_transformers()
    base, options = split_spec(spec)
    options = {**(model_kwargs or {}), **options}
    if not base:
        raise SppError("hf: needs a model type, a folder or a hub id, e.g. hf:llama or hf:./my-model")
    spp_options = {k: options.pop(k) for k in SPP_OPTIONS if k in options}
    name = f"hf:{spec.strip()}"
    with quiet_transformers():
        cls = _model_class(transformers, spp_options.get("class"))
        folder = os.path.expanduser(base)
        if _is_model_type(base) and not os.path.isdir(folder):
            if pretrained:
                raise SppError(
                    f"hf:{base} is a model type (random weights from its default config); for pretrained weights "
                    "give a hub id (hf:org/name) or a local folder (hf:./folder)"
                )
            config = _with_overrides(transformers.AutoConfig.for_model(base), options, spec)
            model = _build(transformers, cls, config, spp_options)
            info = _info(model, config, type(model).__name__, "config", False, None)
        elif os.path.isdir(folder):
            model, info = _from_folder(transformers, cls, folder, options, spp_options, pretrained, spec)
        elif base.startswith((".", "/", "~")) or (os.sep in base and not _HUB_ID.match(base)):
            raise SppError(f"hf:{base}: no such folder")
        elif _HUB_ID.match(base):
            model, info = _from_hub(transformers, cls, base, options, spp_options, pretrained, spec)
        else:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            raise SppError(f"hf:{base} is no model type{close_matches(base, list(CONFIG_MAPPING))}, folder or hub id")
    model.eval()
    return model, name, info


def _from_folder(
    transformers: Any,
    cls: Any,
    folder: str,
    options: dict[str, Any],
    spp_options: dict[str, Any],
    pretrained: bool,
    spec: str,
) -> tuple[Any, HFInfo]:
    import json

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise SppError(f"hf:{folder}: the folder holds no config.json (save the model with save_pretrained)")
    try:
        with open(config_path, encoding="utf-8") as f:
            _refuse_remote_code(json.load(f), spec)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except SppError:
        raise
    except Exception as exc:
        raise SppError(f"hf:{folder}: config.json does not load: {_one_line(exc)}") from None
    config = _with_overrides(config, options, spec)
    tokenizer = folder if _has_tokenizer(folder) else None
    if not pretrained:
        model = _build(transformers, cls, config, spp_options)
        return model, _info(model, config, type(model).__name__, "folder", False, tokenizer)
    files = set(os.listdir(folder))
    safetensors = any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files)
    if not safetensors and not any(f in files for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise SppError(
            f"hf:{folder}: --pretrained, but the folder holds no weights (model.safetensors or pytorch_model.bin)"
        )
    model = _pretrained(cls, folder, config, spp_options, use_safetensors=safetensors, local_only=True, where=folder)
    return model, _info(model, config, type(model).__name__, "folder", True, tokenizer)


def _pretrained(
    cls: Any,
    source: str,
    config: Any,
    spp_options: dict[str, Any],
    *,
    use_safetensors: bool | None,
    local_only: bool,
    where: str,
) -> Any:
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": _dtype(spp_options.get("dtype")),
        "local_files_only": local_only,
        "trust_remote_code": False,
        "weights_only": True,
    }
    if use_safetensors is not None:
        kwargs["use_safetensors"] = use_safetensors
    if spp_options.get("attn_implementation"):
        kwargs["attn_implementation"] = spp_options["attn_implementation"]
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise SppError(f"hf:{where}: the weights do not load: {_one_line(exc)}") from None


def _from_hub(
    transformers: Any,
    cls: Any,
    repo: str,
    options: dict[str, Any],
    spp_options: dict[str, Any],
    pretrained: bool,
    spec: str,
) -> tuple[Any, HFInfo]:
    """A hub id: the local cache first; the network only when it answers at once."""
    local_only = True
    try:
        config = transformers.AutoConfig.from_pretrained(repo, local_files_only=True, trust_remote_code=False)
    except Exception:
        reason = _hub_offline_reason()
        if reason is not None:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            typo = close_matches(repo, list(CONFIG_MAPPING)) if "/" not in repo else ""
            raise SppError(
                f"hf:{repo} is no model type{typo}, and as a hub id it is not in the local cache and the hub "
                f"cannot be reached ({reason}); download it first (huggingface-cli download), or give a local folder"
            ) from None
        local_only = False
        try:
            config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=False)
        except Exception as exc:
            raise SppError(f"hf:{repo}: no config on the hub: {_one_line(exc)}") from None
    _refuse_remote_code(config.to_dict(), spec)
    config = _with_overrides(config, options, spec)
    tokenizer = _cached_tokenizer(transformers, repo)
    if not pretrained:
        model = _build(transformers, cls, config, spp_options)
        return model, _info(model, config, type(model).__name__, "hub", False, tokenizer)
    model = _pretrained(cls, repo, config, spp_options, use_safetensors=None, local_only=local_only, where=repo)
    return model, _info(model, config, type(model).__name__, "hub", True, tokenizer)


def _cached_tokenizer(transformers: Any, repo: str) -> str | None:
    try:
        transformers.AutoTokenizer.from_pretrained(repo, local_files_only=True, trust_remote_code=False)
    except Exception:
        return None
    return repo


def load_tokenizer(source: str) -> Any:
    """The tokenizer saved with a model (a folder or a cached hub id), offline; an SppError if there is none."""
    transformers = _import_transformers()
    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise SppError(f"the tokenizer of {source} does not load offline: {_one_line(exc)}") from None

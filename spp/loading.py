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

import contextlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise SppError(f"--model-kwargs names {dup!r} twice")
    return dict(pairs)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs`` JSON -> dict, with a one-line error (a key given twice is one: JSON would keep the last)."""
    if not text:
        return {}
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise SppError(f"--model-kwargs is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise SppError("--model-kwargs nests too deeply") from None
    if not isinstance(value, dict):
        raise SppError("--model-kwargs must be a JSON object, e.g. '{\"width\": 0.25}'")
    return value


# ---- guards: user code and library noise ------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Noise:
    """What libraries logged and warned inside ``library_noise``: summarised into an error line, or passed on."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.warnings: list[warnings.WarningMessage] = []

    def summary(self) -> str:
        """' (torch logged 12 lines, e.g. ...)': the noise in a few words, for the end of an error line."""
        lines = [r for r in self.records if r.levelno >= logging.WARNING]
        texts = [_first_line(r.getMessage()) for r in lines] + [_first_line(str(w.message)) for w in self.warnings]
        texts = [t for t in texts if t]
        if not texts:
            return ""
        source = lines[0].name.split(".")[0] if lines else "a library"
        example = texts[0] if len(texts[0]) <= 100 else texts[0][:97] + "..."
        return f" ({source} also reported {len(texts)} message(s), e.g. {example!r})"

    def replay(self) -> None:
        """Pass the captured messages on as if never captured (the work succeeded: they are worth seeing)."""
        for r in self.records:
            logging.getLogger(r.name).handle(r)
        for w in self.warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


@contextlib.contextmanager
def library_noise() -> Iterator[Noise]:
    """Capture what torch, timm, huggingface_hub... log and warn inside the block (torch prints a 12-line traceback
    through its logger before raising on a damaged archive): the caller summarises it into its one-line error, or
    calls ``replay()`` when the block succeeded."""
    noise = Noise()
    collect = _Collect(noise.records)
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [lg for lg in list(manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger) and lg.handlers]
    saved = [(lg, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.handlers = [collect]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield noise
            finally:
                noise.warnings.extend(caught)
    finally:
        for lg, handlers in saved:
            lg.handlers = handlers


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what C++ code writes to file descriptor 2 inside the block (torch's c10d prints frames of C++ stack
    while it retries a connection): the list gets its lines when the block ends. Used around calls that fail
    with a Python exception anyway, whose one line is all the user needs; on success the caller may print them."""
    import sys
    import tempfile

    lines: list[str] = []
    try:
        fd = sys.stderr.fileno() if hasattr(sys.stderr, "fileno") else 2
    except (OSError, ValueError):  # a captured stderr (pytest, a notebook) has no descriptor: nothing to do
        fd = 2
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield lines
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read(1 << 20).decode("utf-8", "replace").splitlines())


def user_code_error(exc: BaseException, what: str, hint: str = "", noise: Noise | None = None, *,
                    failed: str = "failed") -> SppError:
    """One line for any exception user code raised, SystemExit and KeyboardInterrupt included. ``what`` names the
    work and its file or model ("the factory net.py:make", "nf_resnet50's forward"), then comes the exception, then
    ``hint`` and the library noise. ``failed`` words an ordinary exception ("failed on input of shape ...")."""
    if isinstance(exc, SppError):
        return exc
    tail = (noise.summary() if noise is not None else "") + hint
    if isinstance(exc, KeyboardInterrupt):
        return SppError(f"interrupted during {what}{tail}", exit_code=130)
    if isinstance(exc, SystemExit):
        return SppError(f"{what} called sys.exit({exc.code!r}){tail}")
    if isinstance(exc, MemoryError):
        return SppError(f"{what} ran out of memory{tail}", exit_code=1)
    first = _first_line(str(exc))  # torch's dispatcher errors go on for lines: the first says what
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return SppError(f"{what} {failed}: {text if len(text) <= 300 else text[:297] + '...'}{tail}")


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run user code (a factory file, a trusted pickle, a hub download): any exception becomes one SppError naming
    ``what``, with the noise libraries printed meanwhile summarised in it; on success that noise is passed on."""
    with library_noise() as noise:
        try:
            yield
        except BaseException as exc:
            raise user_code_error(exc, what, noise=noise) from None
    noise.replay()


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
    """Build a library model: a TypeError from the call is a bad option; anything else, one line naming it."""
    with library_noise() as noise:
        try:
            return fn(*args, **kwargs)
        except TypeError as exc:
            raise SppError(f"bad option for {label}: {one_line(exc)}") from None
        except BaseException as exc:
            raise user_code_error(exc, f"building {label}", noise=noise) from None


PROBE_SECONDS = 3.0
HUB_HOST = "huggingface.co"
TORCH_HUB_HOST = "download.pytorch.org"


def _reachable(host: str, port: int = 443, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` (name lookup included, in a thread: lookups
    have no timeout of their own). Behind a proxy the proxy decides: assumed reachable."""
    import socket
    import threading

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the block: the local cache only, no retries against an absent network."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _pretrained(name: str, host: str, build: Any, cached: Any = None) -> Any:
    """``build()`` a model with pretrained weights, failing fast and in one line when they cannot be had.

    The weights' host is probed first (``PROBE_SECONDS``); when it cannot be reached only the local cache is used
    (huggingface_hub offline; torchvision's file looked up by ``cached()``), so an offline machine gets one line at
    once instead of a minute of retries and their log.
    """
    online = _reachable(host)
    offline_hint = (f"{host} cannot be reached (offline?) and the pretrained weights of {name} are not in the "
                    "local cache; run without --pretrained, or pass --checkpoint FILE")
    if not online and cached is not None and not cached():
        raise SppError(offline_hint)
    with library_noise() as noise, (contextlib.nullcontext() if online else _hub_offline()):
        try:
            model = build()
        except TypeError as exc:
            raise SppError(f"bad option for {name}: {one_line(exc)}") from None
        except BaseException as exc:
            if not online and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise SppError(f"{host} cannot be reached (offline?) and the pretrained weights of {name} could not "
                               f"be loaded from the local cache ({one_line(exc, 160)}); run without --pretrained, "
                               "or pass --checkpoint FILE") from None
            raise user_code_error(exc, f"fetching the pretrained weights of {name}",
                                  "; run without --pretrained or pass --checkpoint", noise) from None
    noise.replay()
    return model


def _load_timm(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise SppError(f"unknown timm model {name!r}{close_matches(name, timm.list_models())}")
    if pretrained:
        model = _pretrained(name, HUB_HOST, lambda: timm.create_model(name, pretrained=True, **kwargs))
    else:
        model = _call(name, timm.create_model, name, pretrained=False, **kwargs)
    return LoadedModel(model, name, "timm", spec, _timm_data_config(model, kwargs))


def _torchvision_cached(name: str) -> bool:
    """Whether torchvision's default weights for ``name`` are in torch.hub's cache already."""
    import torch
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except Exception:  # no weights enum for this model: let torchvision say so
        return True
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return os.path.isfile(path)


def _load_torchvision(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise SppError(f"unknown torchvision model {name!r}{close_matches(name, names)}")
    if pretrained:
        model = _pretrained(name, TORCH_HUB_HOST,
                            lambda: torchvision.models.get_model(name, weights="DEFAULT", **kwargs),
                            cached=lambda: _torchvision_cached(name))
    else:
        model = _call(name, torchvision.models.get_model, name, weights=None, **kwargs)
    return LoadedModel(model, name, "torchvision", spec, dict(IMAGENET_CONFIG))


def builtin_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of built-in model ``name`` checked and typed (``spp.validate.check_model_options``):
    unknown names, bad booleans (``ws=maybe``), non-numbers (``width=abc``) and out-of-range values are refused
    before anything is built."""
    import importlib
    import inspect

    from spp.models import get_entry
    from spp.validate import check_model_options

    entry = get_entry(name)
    module_name, fn_name = entry.family.factory.split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()
                if p.kind == p.KEYWORD_ONLY and p.name not in entry.family.defaults}
    return check_model_options(name, kwargs, defaults, entry.family.kind)


def _load_spp(name: str, spec: str, kwargs: dict[str, Any], pretrained: bool) -> LoadedModel:
    from spp.models import create_model, get_entry

    entry = get_entry(name)  # the unknown-name error, with close matches
    if pretrained:
        raise SppError(f"{name} is a built-in reference model without pretrained weights; drop --pretrained")
    model = create_model(name, **builtin_options(name, kwargs))
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


MAX_SOURCE_BYTES = 16 * 2**20  # a factory file is Python source: megabytes at most


def _load_factory(path: str, factory: str, spec: str, kwargs: dict[str, Any]) -> LoadedModel:
    """Import ``path`` and call ``factory(**kwargs)``: the user's code, run inside ``user_code`` guards so any
    exception (SystemExit and KeyboardInterrupt too) is one line naming the file; a call whose arguments do not fit
    the factory's signature is a bad option, an exception raised inside it is the factory's own."""
    import importlib.util
    import inspect
    import sys

    from torch import nn

    from spp.files import check_input_file

    check_input_file(path, "model file", max_bytes=MAX_SOURCE_BYTES)
    mod_name = f"spp_user_model_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SppError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        with user_code(f"importing {path}"):
            module_spec.loader.exec_module(module)
    except SppError:
        sys.modules.pop(mod_name, None)
        raise
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
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise SppError(f"bad option for {path}:{factory}: {one_line(exc)}") from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass
    with user_code(f"the factory {path}:{factory}"):
        model = fn(**kwargs)
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
    """A saved model: a torch.export archive, a TorchScript archive, or (with ``trust_pickle``) a pickled module.
    Whatever torch logs while it fails to read one is summarised in the one-line error, not printed."""
    import torch
    from torch import nn

    from spp.files import check_input_file

    check_input_file(path, "model file")
    stem = os.path.splitext(os.path.basename(path))[0]
    kind = _archive_kind(path)
    if kind == "export" or path.endswith(".pt2"):
        with library_noise() as noise:
            try:
                program = torch.export.load(path)
            except Exception as exc:
                raise SppError(f"cannot load {path} as a torch.export program: {one_line(exc)}"
                               f"{noise.summary()}") from None
        model: nn.Module
        try:  # unflatten keeps the module hierarchy, so blocks can be hooked; .module() is one flat graph
            with library_noise():
                model = torch.export.unflatten(program)
        except Exception:
            model = program.module()
        return LoadedModel(model, stem, "export", spec, dict(IMAGENET_CONFIG))
    if kind == "torchscript":
        with library_noise() as noise:
            try:
                model = torch.jit.load(path, map_location="cpu")
            except Exception as exc:
                raise SppError(f"cannot load {path} as TorchScript: {one_line(exc)}{noise.summary()}") from None
        return LoadedModel(model, stem, "torchscript", spec, dict(IMAGENET_CONFIG))
    if kind == "legacy":
        with open(path, "rb") as f:
            start = f.read(8)
        if not start.startswith(b"\x80"):  # neither a zip archive nor a pickle (protocol 2+): no PyTorch file
            raise SppError(f"{path} is not a model file spp can read (a torch.export .pt2, a TorchScript archive "
                           f"or a pickled module); it starts with {start!r}")
    with library_noise():
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
    with user_code(f"unpickling {path}"):  # the user trusts this file: its code runs here, guarded
        obj = torch.load(path, map_location="cpu", weights_only=False)
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

    from spp.files import check_input_file

    check_input_file(path, "checkpoint")
    try:
        with library_noise():
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
        with user_code(f"unpickling checkpoint {path}"):
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
    if os.path.exists(spec):  # a file (or something that is not one: _load_file says what it is)
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
    'nf_resnet600?ws=false'``). Values are JSON where they parse (numbers, true/false/null), else strings; a
    built-in model's options are then checked and typed strictly (``builtin_options``: ``ws=no`` is False,
    ``ws=maybe`` an error). A key given twice, a key without a value and a key that is not a name are errors.
    """
    name, sep, query = spec.partition("?")
    if not sep or os.path.exists(spec):
        return spec, {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in query.split(","))):
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or not key or not text:
            raise SppError(f"model options in {spec!r} must read KEY=VALUE[,KEY=VALUE...], not {item!r}")
        if not key.isidentifier():
            raise SppError(f"model option {key!r} in {spec!r} is not a keyword name")
        if key in options:
            raise SppError(f"model option {key!r} is given twice in {spec!r}")
        try:
            value = json.loads(text.lower() if text.lower() in ("true", "false", "null") else text)
        except (json.JSONDecodeError, RecursionError):
            value = text
        options[key] = value
    return name, options


def check_model_spec(spec: object, model_kwargs: dict[str, Any] | None = None) -> None:
    """What can be checked of a model spec before anything is built: its type, its '?' options, and a built-in
    model's options (names, types, ranges). Called by the CLI before a command starts, so a typo in the second
    model of ``spp compare`` fails before the first one is recorded."""
    if not isinstance(spec, str):
        raise SppError(f"model must be a spec string (a name or a path), not {type(spec).__name__}")
    if not spec.strip():
        raise SppError("--model is empty")
    name, options = split_options(spec.strip())
    from spp.models import is_model

    base = name.split(":", 1)[1] if name.startswith("spp:") else name
    if is_model(base):
        builtin_options(base, {**(model_kwargs or {}), **options})


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
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise SppError(f"load_model needs a model spec string (a name or a path), not {type(spec).__name__} "
                       f"{spec!r}")
    if not spec.strip():
        raise SppError("--model is empty")
    if model_kwargs is not None and (not isinstance(model_kwargs, dict)
                                     or any(not isinstance(k, str) for k in model_kwargs)):
        raise SppError(f"model_kwargs must be a dict of keyword arguments, not {model_kwargs!r}")
    for flag, value in (("pretrained", pretrained), ("trust_pickle", trust_pickle)):
        if not isinstance(value, bool):
            raise SppError(f"{flag} must be True or False, not {value!r}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise SppError(f"checkpoint must be a path, not {type(checkpoint).__name__}")
    if spec.strip().startswith("hf:"):  # its options are parsed strictly against the model's config
        loaded = _load_hf(spec.strip()[3:], dict(model_kwargs or {}), pretrained)
        if checkpoint:
            load_checkpoint(loaded.model, str(checkpoint), trust_pickle=trust_pickle)
            loaded.checkpoint = str(checkpoint)
        return loaded
    name, options = split_options(spec.strip())
    loaded = _resolve(name, {**(model_kwargs or {}), **options}, pretrained, trust_pickle)
    if options:
        loaded.name, loaded.spec = spec.strip(), spec.strip()
    if checkpoint:
        checkpoint = os.fspath(checkpoint)
        load_checkpoint(loaded.model, checkpoint, trust_pickle=trust_pickle)
        loaded.checkpoint = checkpoint
    return loaded

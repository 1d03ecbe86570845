"""The one place each user-supplied value is checked: strict types, ranges, finiteness, booleans.

Used by the CLI, ``RunConfig``, model options and the input sources alike, so a value is refused with the same one
line wherever it enters, before any work starts. A value spp cannot honour is an error, never a silent clamp.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from spp.errors import SppError, close_matches

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")

SEED_MAX = 2**64 - 1  # torch.manual_seed takes 64 bits
MAX_ACTIVATION_RANK = 6  # (N, C, D, H, W) and one more: an axis beyond is a typo
# Built-in ResNets: channels = round(c * width / 4) * 4 floored at 4. Below 4 / 64 the 64-channel stem would be
# floored (a clamp, not the width asked for); above 16 a ResNet-50 has ~6 billion parameters.
MIN_RESNET_WIDTH = 4 / 64
MAX_RESNET_WIDTH = 16.0
MAX_WHOLE = 2**31 - 1  # any count spp hands to torch (channels, classes, lengths) fits an int32


def parse_bool(value: object, what: str) -> bool:
    """A boolean from a bool, 0/1, or one of true/false/1/0/yes/no (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
    raise SppError(f"{what} must be true or false (or 1/0, yes/no), not {value!r}")


def whole_number(value: object, what: str, *, minimum: int | None = None, maximum: int | None = None,
                 text: bool = False) -> int:
    """An int (not a bool, not a float) within [minimum, maximum]; with ``text``, a string of digits too."""
    if text and isinstance(value, str):
        stripped = value.strip()
        try:
            value = int(stripped, 10)
        except ValueError:
            raise SppError(f"{what} must be a whole number, not {stripped!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SppError(f"{what} must be a whole number, not {value!r}")
    if minimum is not None and value < minimum:
        raise SppError(f"{what} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise SppError(f"{what} must be at most {maximum}, not {value}")
    return value


def finite_number(value: object, what: str, *, positive: bool = False, minimum: float | None = None,
                  maximum: float | None = None, text: bool = False) -> float:
    """A finite float (ints accepted; with ``text``, a numeric string too), > 0 when ``positive``, within
    [minimum, maximum]."""
    if text and isinstance(value, str):
        stripped = value.strip()
        try:
            value = float(stripped)
        except ValueError:
            raise SppError(f"{what} must be a number, not {stripped!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SppError(f"{what} must be a number, not {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        raise SppError(f"{what} must be a finite number, not {value!r}") from None
    if not math.isfinite(number):
        raise SppError(f"{what} must be a finite number, not {value!r}")
    if positive and number <= 0:
        raise SppError(f"{what} must be positive, not {value!r}")
    if minimum is not None and number < minimum:
        raise SppError(f"{what} must be at least {minimum:g}, not {value!r}")
    if maximum is not None and number > maximum:
        raise SppError(f"{what} must be at most {maximum:g}, not {value!r}")
    return number


def text_value(value: object, what: str, *, empty: bool = False) -> str:
    """A string, stripped; an empty one is an error unless ``empty``."""
    if not isinstance(value, str):
        raise SppError(f"{what} must be a string, not {type(value).__name__} {value!r}")
    if not empty and not value.strip():
        raise SppError(f"{what} is empty")
    return value


def check_batching(batch_size: object, num_samples: object) -> None:
    """Micro-batch settings: a batch size of at least 1, and a sample count of at least 1 when given."""
    whole_number(batch_size, "--batch-size", minimum=1, maximum=MAX_WHOLE)
    if num_samples is not None:
        whole_number(num_samples, "--num-samples", minimum=1, maximum=MAX_WHOLE)


def check_seed(seed: object, what: str = "--seed") -> int:
    """A seed torch can take: a whole number in [0, 2**64 - 1]."""
    return whole_number(seed, what, minimum=0, maximum=SEED_MAX)


def check_channel_dim(channel_dim: object, what: str = "--channel-dim") -> int | None:
    """None (per tensor: 1, or -1 for tokens) or an axis of an activation of at most ``MAX_ACTIVATION_RANK`` axes.

    Whether the axis exists in the tensors a model produces is checked on each tensor (``spp.moments``); this
    refuses what cannot exist in any: 7, or -9.
    """
    if channel_dim is None:
        return None
    return whole_number(channel_dim, what, minimum=-MAX_ACTIVATION_RANK, maximum=MAX_ACTIVATION_RANK - 1)


# The built-in losses of a gradient SPP (``spp.gradients``): a random projection of the output, a classifier's
# cross-entropy against random labels.
LOSSES: tuple[str, ...] = ("random", "xent")


def check_loss(loss: object, what: str = "loss") -> None:
    """A built-in loss name or (library only) a callable; one line otherwise."""
    if callable(loss):
        return
    if not isinstance(loss, str) or loss not in LOSSES:
        raise SppError(f"{what} must be one of {', '.join(LOSSES)} (or, in the library, a function of the model's "
                       f"output returning a scalar), not {loss!r}")


def check_run_settings(settings: Mapping[str, Any]) -> None:
    """Every field of a ``spp.run.RunConfig``, as a user can get it wrong (the CLI's options or a notebook's
    arguments): one line naming the option, before anything is loaded or recorded."""
    model = settings.get("model")
    if not isinstance(model, str):
        raise SppError(f"model must be a spec string, not {type(model).__name__}")
    if not isinstance(settings.get("model_kwargs"), Mapping):
        raise SppError("model_kwargs must be a dict of keyword arguments")
    if any(not isinstance(k, str) for k in settings["model_kwargs"]):
        raise SppError("model keyword arguments must have string names")
    for flag in ("pretrained", "trust_pickle", "stochastic"):
        if not isinstance(settings.get(flag), bool):
            raise SppError(f"{flag} must be True or False, not {settings.get(flag)!r}")
    for option in ("checkpoint", "input", "residual_tap", "label"):
        if settings.get(option) is not None:
            text_value(settings[option], f"--{option.replace('_', '-')}")
    blocks = settings.get("blocks", ())
    if isinstance(blocks, str) or any(not isinstance(b, str) or not b.strip() for b in blocks):
        raise SppError(f"--blocks must be non-empty fnmatch patterns, not {blocks!r}")
    mode = settings.get("mode")
    if mode not in ("train", "eval"):
        raise SppError(f"--mode must be train or eval, not {mode!r}")
    check_batching(settings.get("batch_size"), settings.get("num_samples"))
    if settings.get("resolution") is not None:
        whole_number(settings["resolution"], "--resolution", minimum=1, maximum=MAX_WHOLE)
    if settings.get("in_chans") is not None:
        whole_number(settings["in_chans"], "--in-chans", minimum=1, maximum=MAX_WHOLE)
    check_seed(settings.get("seed"))
    finite_number(settings.get("input_std"), "--input-std", positive=True)
    parse_channel_dims(list(settings.get("channel_dim") or ()))
    if settings.get("seq_len") is not None:
        whole_number(settings["seq_len"], "--seq-len", minimum=1, maximum=MAX_WHOLE)
    text_value(settings.get("device"), "--device")
    text_value(settings.get("dtype"), "--dtype")
    if not isinstance(settings.get("grad", False), bool):
        raise SppError(f"grad must be True or False, not {settings.get('grad')!r}")
    loss = settings.get("loss", "random")
    if not isinstance(loss, str) or loss not in LOSSES:  # a RunConfig is plain data: a built-in loss name
        raise SppError(f"--loss must be one of {', '.join(LOSSES)}, not {loss!r}")


# ---- options of the built-in models --------------------------------------------------------------------------------
def _option_bounds(name: str, kind: str, family_kind: str) -> dict[str, Any]:
    """Range of one option of a built-in family; ``kind`` is its type (from the factory's default)."""
    if name == "width":
        if family_kind == "resnet":
            return {"minimum": MIN_RESNET_WIDTH, "maximum": MAX_RESNET_WIDTH}
        return {"minimum": 1, "maximum": 65536}
    if name == "alpha":
        return {"minimum": 0.0, "maximum": 10.0}
    if name == "mlp_ratio":
        return {"minimum": 1 / 65536, "maximum": 64.0}
    if name == "vocab_size":
        return {"minimum": 2, "maximum": MAX_WHOLE}
    if kind == "int":
        return {"minimum": 1, "maximum": MAX_WHOLE}
    return {"positive": True}


def check_model_options(model: str, options: Mapping[str, Any], defaults: Mapping[str, Any],
                        family_kind: str) -> dict[str, Any]:
    """``options`` for built-in ``model`` checked and typed: names the factory takes (``defaults``: its keyword
    arguments and their defaults), booleans strictly, numbers finite and in range, numeric text parsed.

    ``?ws=no``, ``ws="false"`` and ``{"ws": "false"}`` all mean False; ``ws=maybe`` is an error. A width below
    ``MIN_RESNET_WIDTH`` is refused, not floored to 4 channels.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in defaults:
            known = ", ".join(sorted(defaults))
            raise SppError(f"{model} has no option {name!r}{close_matches(name, defaults)}; its options: {known}")
        default = defaults[name]
        what = f"{model} option {name}" if name not in ("width", "in_chans", "alpha", "activation") \
            else f"--{name.replace('_', '-')} of {model}"
        if value is None and default is None:
            out[name] = None
            continue
        if isinstance(default, bool):
            out[name] = parse_bool(value, what)
        elif isinstance(default, float):
            bounds = _option_bounds(name, "float", family_kind)
            out[name] = finite_number(value, what, text=True, **bounds)
        elif isinstance(default, int) or default is None:  # groups: None means the family's default count
            bounds = _option_bounds(name, "int", family_kind)
            if isinstance(value, float) and value.is_integer():  # --width 256 arrives from the CLI as 256.0
                value = int(value)
            out[name] = whole_number(value, what, text=True, **bounds)
        elif isinstance(default, str):
            out[name] = text_value(value, what)
        else:
            out[name] = value
    return out


# ---- the library's recorder ----------------------------------------------------------------------------------------
def check_recorder_arguments(*, mode: object = None, stochastic: object = False, blocks: object = None,
                             residual_tap: object = None, channel_dim: object = None, taps: object = None,
                             settings: object = None) -> None:
    """The keyword arguments of ``spp.hooks.SignalRecorder`` / ``spp.record``, as a notebook can get them wrong:
    one SppError line naming the argument, before any hook is set (``stochastic="yes"`` is not silently true,
    ``channel_dim=True`` is not axis 1)."""
    from collections.abc import Sequence

    if mode is not None and mode not in ("train", "eval"):
        raise SppError(f"mode must be 'train' or 'eval' (or None to leave the model as it is), not {mode!r}")
    if not isinstance(stochastic, bool):
        raise SppError(f"stochastic must be True or False, not {stochastic!r}")
    if blocks is not None and not isinstance(blocks, str) and (
            not isinstance(blocks, Sequence) or any(not isinstance(b, str) or not b.strip() for b in blocks)):
        raise SppError(f"blocks must be fnmatch patterns (a string or a list of strings), not {blocks!r}")
    if residual_tap is not None:
        text_value(residual_tap, "residual_tap")
    parse_channel_dims(channel_dim, "channel_dim")  # type: ignore[arg-type]  # checked there
    if taps is not None:
        from spp.taps import Tap

        if isinstance(taps, (str, bytes)) or not isinstance(taps, Sequence) or \
                any(not isinstance(t, Tap) for t in taps):
            raise SppError(f"taps must be a list of spp.Tap (from spp.find_taps), not {type(taps).__name__}")
    if settings is not None and (not isinstance(settings, Mapping) or any(not isinstance(k, str) for k in settings)):
        raise SppError(f"settings must be a dict with string keys, not {type(settings).__name__}")


def check_record_call(*, on_batch: object = None, distributed: object = False, settings: object = None) -> None:
    """The arguments ``spp.record`` has beyond the recorder's (a callback, a flag), and the settings it merges."""
    if settings is not None and (not isinstance(settings, Mapping) or any(not isinstance(k, str) for k in settings)):
        raise SppError(f"settings must be a dict with string keys, not {type(settings).__name__}")
    if on_batch is not None and not callable(on_batch):
        raise SppError(f"on_batch must be a function of the samples in a micro-batch, not {type(on_batch).__name__}")
    if not isinstance(distributed, bool):
        raise SppError(f"distributed must be True or False, not {distributed!r}")


def parse_channel_dims(spec: int | str | Mapping[str, int] | Sequence[str] | None,
                       what: str = "--channel-dim") -> list[tuple[str, int]]:
    """``channel_dim`` as (fnmatch pattern on tap or block names, axis) pairs; a bare axis applies to every tap.

    Accepts an int, a mapping ``{"stages.0.*": 1}``, or strings ``"stages.0.*=1"`` / ``"1"`` (repeatable
    ``--channel-dim``). The last matching pattern wins.
    """
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise SppError(f"{what} must be a whole number (an axis) or PATTERN=AXIS, not {spec!r}")
    if isinstance(spec, int):
        return [("*", check_channel_dim(spec, what) or 0)]
    items: list[tuple[str, object]]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        texts = [spec] if isinstance(spec, str) else list(spec)
        items = []
        for text in texts:
            if isinstance(text, int) and not isinstance(text, bool):
                items.append(("*", text))
                continue
            if not isinstance(text, str):
                raise SppError(f"{what} must be AXIS or PATTERN=AXIS, not {text!r}")
            before, eq, after = text.rpartition("=")
            items.append(((before.strip() or "*") if eq else "*", after.strip()))
    out = []
    for key, given in items:
        value: int | None = None
        if isinstance(given, int) and not isinstance(given, bool):
            value = given
        elif isinstance(given, str) and given.lstrip("-").isdigit():
            value = int(given)
        if value is None:
            raise SppError(f"{what} {key}={given}: the axis must be a whole number")
        check_channel_dim(value, what if key == "*" else f"{what} {key}={given}")
        out.append((str(key), value))
    return out

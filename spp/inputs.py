"""Input micro-batches for a recording: Gaussian noise, images (a folder, glob or file), a tensor file; and for
models that read token ids, random ids, Gaussian embeddings (``inputs_embeds``), or a text file through the model's
own tokenizer. Batches of token models are tensors of ids (B, L), or dicts the recorder passes as keyword
arguments (``model(**batch)``) where the model needs more than one input; ids are checked against the model's
vocabulary and position table here, so a bad id is a one-line error, not an IndexError inside an embedding.

Every source is an ``InputSource``: ``num_batches`` micro-batches of at most ``batch_size`` samples,
micro-batch ``j`` always holding the same samples, built lazily when asked for. ``batches(indices)`` yields
only the given micro-batches, so processes that take indices ``r, r + world, ...`` (``shard``) see disjoint
parts of the data whose union is what one process would see. ``make_input`` builds the source behind
``--input``.
"""

from __future__ import annotations

import glob
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spp.errors import SppError
from spp.loading import IMAGENET_CONFIG
from spp.validate import check_batching, check_seed, finite_number

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TENSOR_EXTENSIONS = (".pt", ".pth", ".npy")
MAX_DEFAULT_IMAGES = 256  # without --num-samples, a folder contributes at most this many images
GAUSSIAN_NAMES = ("gaussian", "gauss", "normal", "randn", "noise")
DEFAULT_RESOLUTION = 128  # height and width of inputs for models that do not say their own


class InputSource(ABC):
    """What the recorder consumes: ``num_batches`` micro-batches, each built on demand by ``batch(j)``."""

    num_samples: int
    batch_size: int

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_slice(self, j: int) -> range:
        """The sample indices in micro-batch ``j``."""
        if not 0 <= j < self.num_batches:
            raise IndexError(f"micro-batch {j} out of range: there are {self.num_batches}")
        return range(j * self.batch_size, min((j + 1) * self.batch_size, self.num_samples))

    @abstractmethod
    def batch(
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Micro-batch ``j`` on ``device``; floating-point data in ``dtype``."""

    def batches(
        self,
        indices: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Micro-batches ``indices`` (default: all, in order); empty ones (no readable sample) skipped."""
        for j in range(self.num_batches) if indices is None else indices:
            x = self.batch(j, device, dtype)
            if x.shape[0]:
                yield x

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Plain settings for the Record (what the input was)."""


def limit_samples(source: InputSource, num_samples: int) -> InputSource:
    """A copy of ``source`` that stops after its first ``num_samples`` samples (the micro-batches keep their
    samples; a shorter last one disappears): how a recording drops a remainder it cannot normalise."""
    import copy

    if not 1 <= num_samples <= source.num_samples:
        raise ValueError(f"cannot limit {source.num_samples} samples to {num_samples}")
    limited = copy.copy(source)
    object.__setattr__(limited, "num_samples", num_samples)  # frozen dataclasses too
    return limited


def _floating(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)  # token ids, masks: keep their dtype


# ---- Gaussian ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianInput(InputSource):
    """``num_samples`` samples of shape ``shape`` (C, H, W), in micro-batches of ``batch_size``.

    Micro-batch j is drawn from its own generator seeded with (seed, j), so any subset of the batches (one
    process's shard) reproduces exactly the samples a single process would see.
    """

    shape: tuple[int, ...]
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    std: float = 1.0

    def __post_init__(self) -> None:
        check_batching(self.batch_size, self.num_samples)
        check_seed(self.seed)
        finite_number(self.std, "--input-std", positive=True)
        if not self.shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.shape):
            raise SppError(f"input shape must be positive whole numbers, not {tuple(self.shape)}")

    def batch(
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        n = len(self.batch_slice(j))
        # (seed, j) -> one 64-bit generator seed; the same as seed * 1_000_003 + j wherever that fits in 64 bits
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + j) % 2**64)
        x = torch.randn((n, *self.shape), generator=gen)
        if self.std != 1.0:
            x.mul_(self.std)
        return x.to(device=device, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "input": "gaussian",
            "input_std": self.std,
            "input_shape": list(self.shape),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


# ---- images ------------------------------------------------------------------------------------------------


TOKEN_NAMES = ("tokens", "embeddings")  # --input values that make samples for a token model


def input_files(spec: str | None) -> list[str]:
    """Every file ``--input spec`` reads: none for generated inputs (Gaussian, tokens, embeddings), the file for a
    tensor or text file, else the images ``find_images`` finds. The cache fingerprints them, and no output may
    replace one."""
    if spec is None or spec.strip().lower() in (*GAUSSIAN_NAMES, *TOKEN_NAMES):
        return []
    path = os.path.expanduser(spec.strip())
    if path.lower().endswith((*TENSOR_EXTENSIONS, ".txt")):
        return [path]
    return find_images(path)


def find_images(path: str) -> list[str]:
    """Image files named by ``path``: a folder (searched recursively), a glob pattern, or one file; sorted.

    Only regular files count: a pipe or device named like an image would make the read hang.
    """
    from spp.files import check_input_file

    if os.path.isdir(path):
        found = [
            os.path.join(root, f)
            for root, _, files in os.walk(path)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))
        ]
        if not found:
            raise SppError(f"--input {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return sorted(found)
    if os.path.lexists(path):
        return [str(check_input_file(path, "--input"))]
    if glob.has_magic(path):
        found = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        if not found:
            raise SppError(f"--input {path}: the pattern matches no file")
        return sorted(found)
    raise SppError(f"--input {path}: no such file or folder")


class ImageInput(InputSource):
    """Images preprocessed as for evaluation: resize, center crop to ``input_size``, normalise with mean/std.

    The transform is timm's ``create_transform`` with the model's data config (``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``), which for non-timm models is the ImageNet default.

    Micro-batches are formed from readable images only: on construction the files are decoded in order until
    ``num_samples`` of them have opened (every file, up to MAX_DEFAULT_IMAGES, without ``num_samples``); the ones
    that do not open are skipped with one warning and counted in ``describe()["skipped_images"]``. So micro-batch
    j always holds ``batch_size`` images (but the last), whichever files are broken, and a rank's shard holds the
    same images as in one process. Files are decoded again when their micro-batch is asked for.
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        input_size: tuple[int, int, int],
        num_samples: int | None = None,
        batch_size: int = 8,
        data_config: dict[str, Any] | None = None,
        where: str = "",
    ) -> None:
        if not files:
            raise SppError(f"--input {where}: no images")
        check_batching(batch_size, num_samples)
        chans = int(input_size[0])
        if chans not in (1, 3):
            raise SppError(f"--input {where}: images have 1 or 3 channels, the model expects {chans}")
        self.files = list(files)
        self.where = where or os.path.commonpath([os.path.abspath(f) for f in self.files])
        self.available = len(self.files)
        self.batch_size = batch_size
        self.input_size = (chans, int(input_size[1]), int(input_size[2]))
        self.skipped: dict[str, str] = {}
        wanted = num_samples if num_samples is not None else min(self.available, MAX_DEFAULT_IMAGES)
        self.used = self._readable(wanted)
        self.num_samples = len(self.used)
        if not self.used:
            first = next(iter(self.skipped.items()), ("", ""))
            raise SppError(f"--input {self.where}: no usable image ({len(self.skipped)} unreadable, "
                           f"e.g. {first[0]}: {first[1]})")
        if self.skipped:
            path, reason = next(iter(self.skipped.items()))
            warnings.warn(f"--input {self.where}: skipped {len(self.skipped)} unreadable image(s), e.g. {path}: "
                          f"{reason}; using {self.num_samples} readable ones", stacklevel=2)
        if num_samples is not None and num_samples > self.num_samples:
            warnings.warn(
                f"--input {self.where}: {num_samples} samples asked for, {self.num_samples} readable images "
                f"found; using {self.num_samples}",
                stacklevel=2,
            )
        config = {**IMAGENET_CONFIG, **(data_config or {})}
        mean, std = tuple(config["mean"]), tuple(config["std"])
        if chans == 1:  # one grey channel: one mean/std
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        self.mean, self.std = mean, std
        self.interpolation = str(config.get("interpolation") or "bilinear")
        self.crop_pct = float(config.get("crop_pct") or 0.875)
        self.crop_mode = str(config.get("crop_mode") or "center")
        self._transform = None

    def _readable(self, wanted: int) -> list[str]:
        """The first ``wanted`` files, in order, that decode as images; the others go to ``self.skipped``."""
        from PIL import Image

        used: list[str] = []
        for path in self.files:
            if len(used) >= wanted:
                break
            try:
                with Image.open(path) as opened:
                    opened.load()
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                self.skipped[path] = " ".join(str(exc).split())[:120] or type(exc).__name__
                continue
            used.append(path)
        return used

    def transform(self):
        """timm's eval transform (resize, center crop, to tensor, normalise), built once."""
        if self._transform is None:
            from timm.data import create_transform

            self._transform = create_transform(
                input_size=self.input_size,
                is_training=False,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
                crop_pct=self.crop_pct,
                crop_mode=self.crop_mode,
            )
        return self._transform

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.convert("L" if self.input_size[0] == 1 else "RGB")
        return self.transform()(image)

    def batch(
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        images, bad = [], []
        for i in self.batch_slice(j):
            path = self.used[i]
            try:
                images.append(self.load(path))
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                reason = " ".join(str(exc).split())[:120] or type(exc).__name__
                self.skipped[path] = reason
                bad.append(path)
        if bad:
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) in micro-batch {j} ({len(self.skipped)} so far), "
                f"e.g. {bad[0]}: {self.skipped[bad[0]]}",
                stacklevel=2,
            )
        if not images:
            return torch.empty((0, *self.input_size), device=device, dtype=dtype)
        return torch.stack(images).to(device=device, dtype=dtype)

    def batches(
        self,
        indices: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        asked = list(range(self.num_batches) if indices is None else indices)
        yielded = 0
        for x in super().batches(asked, device, dtype):
            yielded += 1
            yield x
        if asked and not yielded:
            first = next(iter(self.skipped.items()), ("", ""))
            raise SppError(
                f"--input {self.where}: no usable image ({len(self.skipped)} unreadable, "
                f"e.g. {first[0]}: {first[1]})"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "input": "images",
            "input_path": self.where,
            "input_shape": list(self.input_size),
            "num_samples": self.num_samples,
            "images_found": self.available,
            "batch_size": self.batch_size,
            "input_mean": list(self.mean),
            "input_std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "skipped_images": len(self.skipped),
        }


# ---- tensor files ------------------------------------------------------------------------------------------


def _refuse_dtype(path: str, kind: str, dtype: Any) -> None:
    """Numbers spp can feed a model: floats, and integers (token ids, uint8 images); not complex, bool or text."""
    if kind == "c":
        raise SppError(f"--input {path}: holds complex values ({dtype}); spp records real signals, save the real "
                       "part or the magnitude")
    if kind == "b":
        raise SppError(f"--input {path}: holds booleans ({dtype}), not numbers; save them as float32")
    if kind not in "iuf":
        raise SppError(f"--input {path}: a file of numbers is needed, not dtype {dtype}")


def _load_npy(path: str) -> Any:
    """A ``.npy`` array, memory-mapped, after its header has been read and checked against the file's size."""
    import numpy as np

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0  # 3.0 differs from 2.0 only in the field names' encoding
            shape, _fortran, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        why = "it does not start with the .npy magic bytes" if "magic" in str(exc).lower() else \
            " ".join(str(exc).split())[:160]
        raise SppError(f"--input {path}: not a .npy file ({why})") from None
    if dtype.hasobject:
        raise SppError(f"--input {path}: holds Python objects (dtype {dtype}), which only unpickling can read; "
                       "spp reads numbers only")
    _refuse_dtype(path, dtype.kind, dtype)
    claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if claimed != size - offset:
        raise SppError(f"--input {path}: its header claims shape {tuple(shape)} of {dtype} ({claimed} bytes) but "
                       f"the file holds {size - offset} bytes after it (truncated or damaged)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SppError(f"--input {path}: cannot read ({' '.join(str(exc).split())[:160]})") from None


def _check_tensor(path: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor spp can slice into micro-batches: dense, real, on a plain storage that holds what its shape and
    strides claim (checked before anything iterates over it)."""
    if t.layout != torch.strided:
        raise SppError(f"--input {path}: a {str(t.layout).replace('torch.', '')} tensor; save it dense "
                       "(tensor.to_dense())")
    if t.is_quantized or t.is_meta or t.is_nested:
        raise SppError(f"--input {path}: a quantized, meta or nested tensor; save a plain dense tensor")
    _refuse_dtype(path, "c" if t.is_complex() else "b" if t.dtype == torch.bool else
                  "f" if t.is_floating_point() else "i", t.dtype)
    if t.numel():
        needed = (t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1)
        if any(st < 0 for st in t.stride()) or needed * t.element_size() > t.untyped_storage().nbytes():
            raise SppError(f"--input {path}: the tensor claims shape {tuple(t.shape)} but its data hold "
                           f"{t.untyped_storage().nbytes()} bytes (damaged file)")
    return t


def load_tensor_file(path: str) -> Any:
    """A ``.pt`` tensor (or a dict holding exactly one) or a ``.npy`` array, memory-mapped where possible.

    The path must be a regular file (``spp.files.check_input_file``); a ``.npy`` header is checked against the
    file's size and a tensor's claimed size against its storage before any sample is read; only real numbers are
    accepted (integers too: token ids).
    """
    from spp.errors import one_line
    from spp.files import check_input_file

    check_input_file(path, "--input")
    if path.lower().endswith(".npy"):
        return _load_npy(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on sparse checks or legacy files: not the user's news
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SppError(
            f"--input {path}: not a tensor file torch.load reads with weights_only=True ({one_line(exc, 160)})"
        ) from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(map(str, list(obj)[:6])) or "none"
            raise SppError(f"--input {path}: a dict with exactly one tensor is needed; keys: {keys}")
        obj = next(iter(tensors.values()))
    if not isinstance(obj, torch.Tensor):
        raise SppError(f"--input {path}: holds a {type(obj).__name__}, not a tensor")
    return _check_tensor(path, obj)


def input_hint(source: InputSource) -> str:
    """A hint for the end of a forward's error when the input is of integers: images need floats."""
    data = getattr(source, "data", None)
    dtype = getattr(data, "dtype", None)
    if dtype is None:
        return ""
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else getattr(dtype, "kind", "f") == "f"
    if floating:
        return ""
    return (f" (the input holds {str(dtype).replace('torch.', '')} values: models of images need floats, e.g. "
            "uint8 pixels saved as float32 / 255; integers suit models that embed token ids)")


class TensorInput(InputSource):
    """Samples from a tensor of shape (N, ...), sliced per micro-batch (lazily, from a memory map if any)."""

    def __init__(
        self,
        data: Any,
        *,
        num_samples: int | None = None,
        batch_size: int = 8,
        in_chans: int | None = None,
        where: str = "tensor",
    ) -> None:
        shape = tuple(int(d) for d in data.shape)
        if len(shape) < 2:
            raise SppError(
                f"--input {where}: shape {shape} has no batch axis; expected (N, C, H, W) or (N, ...)"
            )
        if shape[0] == 0:
            raise SppError(f"--input {where}: shape {shape} holds no samples")
        if in_chans is not None and len(shape) == 4 and shape[1] != in_chans:
            raise SppError(
                f"--input {where}: shape {shape} has {shape[1]} channels, the model expects {in_chans}"
            )
        check_batching(batch_size, num_samples)
        if num_samples is not None and num_samples > shape[0]:
            warnings.warn(
                f"--input {where}: {num_samples} samples asked for, {shape[0]} present; using {shape[0]}",
                stacklevel=2,
            )
        self.data = data
        self.shape = shape
        self.where = where
        self.num_samples = min(num_samples or shape[0], shape[0])
        self.batch_size = batch_size

    def batch(
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        part = self.batch_slice(j)
        chunk = self.data[part.start : part.stop]
        if not isinstance(chunk, torch.Tensor):
            import numpy as np

            chunk = torch.from_numpy(np.array(chunk))  # copies the slice out of the memory map
        return _floating(chunk, device, dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "input": "tensor",
            "input_path": self.where,
            "input_shape": list(self.shape[1:]),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "input_dtype": str(self.data.dtype),
        }


# ---- the --input resolver ----------------------------------------------------------------------------------


def make_input(
    kind_or_path: str | None,
    *,
    shape: Sequence[int] | None = None,
    num_samples: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    std: float = 1.0,
    data_config: dict[str, Any] | None = None,
    resolution: int | None = None,
    in_chans: int | None = None,
    tokens: dict[str, Any] | None = None,
    seq_len: int | None = None,
) -> InputSource:
    """The source behind ``--input``.

    Image models: None or "gaussian" -> GaussianInput; a ``.pt``/``.npy`` file -> TensorInput; a folder, glob or
    image file -> ImageInput. ``shape`` (C, H, W) is the Gaussian sample shape; without it (and for images) the size
    comes from ``resolution``, else the model's ``data_config["input_size"]``, else ``DEFAULT_RESOLUTION``.
    ``in_chans`` (else the data config's) is checked against 4-D tensor files. ``num_samples`` None: one
    micro-batch of noise, every sample of a tensor file, every image up to MAX_DEFAULT_IMAGES.

    Token models (``tokens``: what ``spp.loading.LoadedModel.tokens`` says of the model): None or "tokens" ->
    TokenInput (uniform random ids); "embeddings" -> EmbeddingInput (Gaussian ``inputs_embeds``); a ``.txt`` file ->
    TextInput (the model's tokenizer); a ``.pt``/``.npy`` of integer ids (N, L) -> TensorInput, ids checked.
    ``seq_len``: tokens per sequence (default: what the model requires, else DEFAULT_SEQ_LEN).
    """
    text = None if kind_or_path is None else kind_or_path.strip()
    lowered = (text or "").lower()
    if tokens is not None:
        return _token_input(lowered, text, tokens, num_samples=num_samples, batch_size=batch_size, seed=seed,
                            std=std, seq_len=seq_len)
    if lowered in TOKEN_NAMES or lowered.endswith(".txt"):
        raise SppError(f"--input {text}: this model reads images, not token ids; token inputs need a model that "
                       "does (hf:..., or a reference transformer such as preln_transformer12)")
    config = dict(data_config or {})
    known = tuple(config.get("input_size") or ())
    chans = in_chans or (int(known[0]) if known else None)
    if resolution is not None:
        size = (int(resolution), int(resolution))
    elif known:
        size = (int(known[1]), int(known[2]))
    else:
        size = (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
    if text is None or lowered in GAUSSIAN_NAMES:
        sample = tuple(int(d) for d in shape) if shape else (chans or 3, *size)
        return GaussianInput(
            sample, num_samples=num_samples or batch_size, batch_size=batch_size, seed=seed, std=std
        )
    path = os.path.expanduser(text)
    if path.lower().endswith(TENSOR_EXTENSIONS):
        return TensorInput(
            load_tensor_file(path), num_samples=num_samples, batch_size=batch_size, in_chans=chans, where=path
        )
    files = find_images(path)
    return ImageInput(
        files,
        input_size=(chans or 3, *size),
        num_samples=num_samples,
        batch_size=batch_size,
        data_config=config,
        where=path,
    )


def _token_input(lowered: str, text: str | None, tokens: dict[str, Any], *, num_samples: int | None,
                 batch_size: int, seed: int, std: float, seq_len: int | None) -> InputSource:
    """The source for a model that reads token ids (see ``make_input``)."""
    required = tokens.get("seq_len")
    length = seq_len if seq_len is not None else required if required is not None else DEFAULT_SEQ_LEN
    decoder = bool(tokens.get("is_encoder_decoder"))
    max_positions = tokens.get("max_positions")
    vocab = tokens.get("vocab_size")
    if text is None or lowered == "tokens":
        if vocab is None:
            raise SppError("--input tokens: the model does not say its vocabulary size; use --input embeddings")
        return TokenInput(int(vocab), seq_len=length, num_samples=num_samples or batch_size, batch_size=batch_size,
                          seed=seed, decoder=decoder, max_positions=max_positions)
    if lowered == "embeddings":
        hidden = tokens.get("hidden_size")
        if hidden is None:
            raise SppError("--input embeddings: the model does not say its hidden size; use --input tokens")
        return EmbeddingInput(int(hidden), seq_len=length, num_samples=num_samples or batch_size,
                              batch_size=batch_size, seed=seed, std=std, decoder=decoder, max_positions=max_positions)
    if lowered in GAUSSIAN_NAMES:
        raise SppError(f"--input {text}: Gaussian images do not fit a model that reads token ids; the analogue is "
                       "--input embeddings (Gaussian inputs_embeds), or --input tokens")
    assert text is not None
    path = os.path.expanduser(text)
    if path.lower().endswith(".txt"):
        return TextInput.from_file(path, tokenizer=tokens.get("tokenizer"), vocab_size=vocab, seq_len=length,
                                   num_samples=num_samples, batch_size=batch_size, decoder=decoder,
                                   max_positions=max_positions)
    if path.lower().endswith(TENSOR_EXTENSIONS):
        if not os.path.isfile(path):
            raise SppError(f"--input {path}: no such file")
        data = load_tensor_file(path)
        if _is_integer(data.dtype):
            check_token_ids(data, vocab_size=vocab, where=path)
        return TensorInput(data, num_samples=num_samples, batch_size=batch_size, where=path)
    raise SppError(f"--input {text}: a model that reads token ids takes tokens, embeddings, a .txt file, or a "
                   ".pt/.npy of ids (N, L)")


# ---- token models: random ids, Gaussian embeddings, text -----------------------------------------------------
DEFAULT_SEQ_LEN = 128
MAX_DEFAULT_SEQUENCES = 64  # without --num-samples, a text file contributes at most this many sequences
Batch = torch.Tensor | dict[str, torch.Tensor]


def _is_integer(dtype: Any) -> bool:
    """A torch or numpy integer dtype (not bool, not floating)."""
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return getattr(dtype, "kind", "") in ("i", "u")


def check_token_ids(ids: Any, *, vocab_size: int | None, where: str) -> None:
    """An integer (N, L) array of ids in [0, vocab_size); a one-line SppError otherwise.

    Works on tensors and (memory-mapped) numpy arrays; one pass over the data for min and max.
    """
    dtype = getattr(ids, "dtype", None)
    if not _is_integer(dtype):
        raise SppError(f"--input {where}: token ids must be integers, not {dtype}")
    shape = tuple(int(d) for d in ids.shape)
    if len(shape) != 2:
        raise SppError(f"--input {where}: token ids must be (N, L), not shape {shape}")
    if not shape[0] or not shape[1]:
        raise SppError(f"--input {where}: shape {shape} holds no tokens")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise SppError(f"--input {where}: token id {low} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise SppError(
            f"--input {where}: token id {high} is outside the model's vocabulary (ids 0..{vocab_size - 1}); "
            "were these ids made by another tokenizer?"
        )


def check_seq_len(seq_len: int, *, max_positions: int | None, where: str) -> None:
    """A sequence length the model's position table holds (models without one take any length)."""
    if seq_len < 1:
        raise SppError(f"--seq-len must be at least 1, not {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise SppError(
            f"{where}: sequences of {seq_len} tokens, but the model's position table holds {max_positions}; "
            f"use --seq-len {max_positions} or less"
        )


def _check_counts(num_samples: int, batch_size: int) -> None:
    if batch_size < 1 or num_samples < 1:
        raise SppError("--batch-size and --num-samples must be at least 1")


def _generator(seed: int, j: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + j)  # the same scheme as GaussianInput


class _DictBatches(InputSource):
    """``batches()`` for sources whose micro-batches may be dicts (``InputSource.batches`` reads ``.shape``)."""

    def batches(  # type: ignore[override]
        self,
        indices: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Batch]:
        for j in range(self.num_batches) if indices is None else indices:
            yield self.batch(j, device, dtype)


# ---- random token ids --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInput(_DictBatches):
    """Token ids drawn uniformly from ``[0, vocab_size)``: (num_samples, seq_len), in micro-batches.

    Micro-batch j comes from a generator seeded with (seed, j). ``decoder=True`` (encoder-decoder models) yields
    ``{"input_ids": ids, "decoder_input_ids": ids}``: the decoder reads the same ids.
    """

    vocab_size: int
    seq_len: int = DEFAULT_SEQ_LEN
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    decoder: bool = False
    max_positions: int | None = None

    def __post_init__(self) -> None:
        _check_counts(self.num_samples, self.batch_size)
        if self.vocab_size < 1:
            raise SppError(f"the model's vocabulary is empty (vocab_size={self.vocab_size})")
        check_seq_len(self.seq_len, max_positions=self.max_positions, where="--input tokens")

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        n = len(self.batch_slice(j))
        ids = torch.randint(0, self.vocab_size, (n, self.seq_len), generator=_generator(self.seed, j))
        ids = ids.to(device)
        return {"input_ids": ids, "decoder_input_ids": ids} if self.decoder else ids

    def describe(self) -> dict[str, Any]:
        return {
            "input": "tokens",
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len],
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "decoder_input": "same ids" if self.decoder else "",
        }


# ---- Gaussian embeddings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingInput(_DictBatches):
    """``inputs_embeds`` ~ N(0, std^2) of shape (num_samples, seq_len, hidden_size): the layers' input without
    the embedding table, and without what the table's module applies (transformers 5 scales Gemma's embeddings by
    sqrt(hidden_size) inside the embedding module, so x reaches the first layer unscaled).

    Yields ``{"inputs_embeds": x}`` (plus ``decoder_inputs_embeds``: the same x, for encoder-decoder models).
    """

    hidden_size: int
    seq_len: int = DEFAULT_SEQ_LEN
    num_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    std: float = 1.0
    decoder: bool = False
    max_positions: int | None = None

    def __post_init__(self) -> None:
        _check_counts(self.num_samples, self.batch_size)
        if self.hidden_size < 1:
            raise SppError(f"hidden size must be positive, not {self.hidden_size}")
        check_seq_len(self.seq_len, max_positions=self.max_positions, where="--input embeddings")

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        n = len(self.batch_slice(j))
        x = torch.randn((n, self.seq_len, self.hidden_size), generator=_generator(self.seed, j))
        if self.std != 1.0:
            x.mul_(self.std)
        x = x.to(device=device, dtype=dtype)
        return {"inputs_embeds": x, "decoder_inputs_embeds": x} if self.decoder else {"inputs_embeds": x}

    def describe(self) -> dict[str, Any]:
        return {
            "input": "embeddings",
            "input_std": self.std,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len, self.hidden_size],
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


# ---- text --------------------------------------------------------------------------------------------------


def _tokenize_file(path: str, tokenizer: Any, needed: int) -> torch.Tensor:
    """The file's token ids, no special tokens, read in pieces of whole lines until ``needed`` ids are there (a
    large corpus is not read whole). Pieces end at line breaks, where tokenizers do not merge across."""
    from spp.hf import quiet_transformers

    ids: list[int] = []
    piece: list[str] = []
    size, seen_text = 0, False
    try:
        with open(path, encoding="utf-8") as f, quiet_transformers():
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _PIECE_CHARS:
                    seen_text |= any(p.strip() for p in piece)
                    ids.extend(tokenizer("".join(piece), add_special_tokens=False)["input_ids"])
                    piece, size = [], 0
                    if len(ids) >= needed:
                        break
            if piece and len(ids) < needed:
                seen_text |= any(p.strip() for p in piece)
                ids.extend(tokenizer("".join(piece), add_special_tokens=False)["input_ids"])
    except UnicodeDecodeError:
        raise SppError(f"--input {path}: not UTF-8 text") from None
    if not seen_text:
        raise SppError(f"--input {path}: the file holds no text")
    return torch.tensor(ids, dtype=torch.long)


_PIECE_CHARS = 1 << 18


class TextInput(_DictBatches):
    """A text file through the model's own tokenizer, cut into consecutive sequences of ``seq_len`` tokens.

    The text is tokenised as one stream (no special tokens between pieces), only as far as the sequences asked for
    need; the last partial sequence is dropped. Without ``num_samples``, at most MAX_DEFAULT_SEQUENCES sequences.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        num_samples: int | None = None,
        batch_size: int = 8,
        decoder: bool = False,
        where: str = "text",
        tokenizer: str = "",
    ) -> None:
        if ids.ndim != 1:
            raise SppError(f"--input {where}: expected one stream of token ids, not shape {tuple(ids.shape)}")
        if batch_size < 1 or (num_samples is not None and num_samples < 1):
            raise SppError("--batch-size and --num-samples must be at least 1")
        available = int(ids.numel()) // seq_len
        if available < 1:
            raise SppError(
                f"--input {where}: the text gives {ids.numel()} tokens, fewer than one sequence of {seq_len}; "
                "use a longer text or a smaller --seq-len"
            )
        wanted = num_samples if num_samples is not None else min(available, MAX_DEFAULT_SEQUENCES)
        if wanted > available:
            raise SppError(
                f"--input {where}: {wanted} sequences of {seq_len} tokens asked for, the text gives {available}"
            )
        self.data = ids[: wanted * seq_len].reshape(wanted, seq_len).contiguous()
        self.seq_len, self.num_samples, self.batch_size = seq_len, wanted, batch_size
        self.decoder, self.where, self.tokenizer = decoder, where, tokenizer
        self.tokens_read = int(ids.numel())

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        tokenizer: str | None,
        vocab_size: int | None,
        seq_len: int = DEFAULT_SEQ_LEN,
        num_samples: int | None = None,
        batch_size: int = 8,
        decoder: bool = False,
        max_positions: int | None = None,
    ) -> TextInput:
        """Tokenise ``path`` with the tokenizer saved at ``tokenizer`` (a folder or cached hub id; see spp.hf)."""
        check_seq_len(seq_len, max_positions=max_positions, where=f"--input {path}")
        if not os.path.isfile(path):
            raise SppError(f"--input {path}: no such file")
        if tokenizer is None:
            raise SppError(
                f"--input {path}: text needs the model's tokenizer, and this model has none saved "
                "(hf:TYPE models are built from a config alone); load the model from a folder or a cached hub id "
                "that holds its tokenizer, or use --input tokens"
            )
        from spp.hf import load_tokenizer

        tok = load_tokenizer(tokenizer)
        needed = (num_samples if num_samples is not None else MAX_DEFAULT_SEQUENCES) * seq_len
        ids = _tokenize_file(path, tok, needed)
        if ids.numel():
            check_token_ids(ids.reshape(1, -1), vocab_size=vocab_size, where=path)
        return cls(
            ids,
            seq_len=seq_len,
            num_samples=num_samples,
            batch_size=batch_size,
            decoder=decoder,
            where=path,
            tokenizer=tokenizer,
        )

    def batch(  # type: ignore[override]
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Batch:
        part = self.batch_slice(j)
        ids = self.data[part.start : part.stop].to(device)
        return {"input_ids": ids, "decoder_input_ids": ids} if self.decoder else ids

    def describe(self) -> dict[str, Any]:
        return {
            "input": "text",
            "input_path": self.where,
            "tokenizer": self.tokenizer,
            "seq_len": self.seq_len,
            "input_shape": [self.seq_len],
            "num_samples": self.num_samples,
            "tokens_read": self.tokens_read,
            "batch_size": self.batch_size,
        }

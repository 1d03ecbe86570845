"""Input micro-batches for a recording: Gaussian noise, images (a folder, glob or file), or a tensor file.

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
from spp.validate import check_batching

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
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise SppError(f"input shape must be positive, not {tuple(self.shape)}")

    def batch(
        self, j: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        n = len(self.batch_slice(j))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
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


def find_images(path: str) -> list[str]:
    """Image files named by ``path``: a folder (searched recursively), a glob pattern, or one file; sorted."""
    if os.path.isdir(path):
        found = [
            os.path.join(root, f)
            for root, _, files in os.walk(path)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not found:
            raise SppError(f"--input {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return sorted(found)
    if os.path.isfile(path):
        return [path]
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


def load_tensor_file(path: str) -> Any:
    """A ``.pt`` tensor (or a dict holding exactly one) or a ``.npy`` array, memory-mapped where possible."""
    if path.lower().endswith(".npy"):
        import numpy as np

        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise SppError(
                f"--input {path}: not a plain numeric .npy array ({' '.join(str(exc).split())})"
            ) from None
        except OSError as exc:
            raise SppError(f"--input {path}: cannot read ({exc})") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise SppError(f"--input {path}: a .npy of numbers is needed, not dtype {array.dtype}")
        return array
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SppError(
            f"--input {path}: not a tensor file torch.load reads with weights_only=True "
            f"({type(exc).__name__})"
        ) from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(map(str, list(obj)[:6])) or "none"
            raise SppError(f"--input {path}: a dict with exactly one tensor is needed; keys: {keys}")
        obj = next(iter(tensors.values()))
    if not isinstance(obj, torch.Tensor):
        raise SppError(f"--input {path}: holds a {type(obj).__name__}, not a tensor")
    return obj


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
) -> InputSource:
    """The source behind ``--input``: None or "gaussian" -> GaussianInput; a ``.pt``/``.npy`` file ->
    TensorInput; a folder, glob or image file -> ImageInput.

    ``shape`` (C, H, W) is the Gaussian sample shape; without it (and for images) the size comes from
    ``resolution``, else the model's ``data_config["input_size"]``, else ``DEFAULT_RESOLUTION``. ``in_chans``
    (else the data config's) is checked against 4-D tensor files. ``num_samples`` None: one micro-batch of
    noise, every sample of a tensor file, every image up to MAX_DEFAULT_IMAGES.
    """
    config = dict(data_config or {})
    known = tuple(config.get("input_size") or ())
    chans = in_chans or (int(known[0]) if known else None)
    if resolution is not None:
        size = (int(resolution), int(resolution))
    elif known:
        size = (int(known[1]), int(known[2]))
    else:
        size = (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
    if kind_or_path is None or kind_or_path.strip().lower() in GAUSSIAN_NAMES:
        sample = tuple(int(d) for d in shape) if shape else (chans or 3, *size)
        return GaussianInput(
            sample, num_samples=num_samples or batch_size, batch_size=batch_size, seed=seed, std=std
        )
    path = os.path.expanduser(kind_or_path)
    if path.lower().endswith(TENSOR_EXTENSIONS):
        if not os.path.isfile(path):
            raise SppError(f"--input {path}: no such file")
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

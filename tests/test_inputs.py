"""Input sources: Gaussian, image folders / globs / files, tensor files; lazily batched and shardable."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from spp.distributed import Context
from spp.errors import SppError
from spp.inputs import DEFAULT_RESOLUTION, GaussianInput, ImageInput, InputSource, TensorInput, make_input

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 0.875}


def reference_transform(size: int, mean, std, crop_pct: float = 0.875, interpolation=T.InterpolationMode.BILINEAR):
    """Eval preprocessing written out: shorter side to floor(size / crop_pct), center crop, scale, normalise."""
    return T.Compose(
        [
            T.Resize(math.floor(size / crop_pct), interpolation=interpolation),
            T.CenterCrop(size),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


@pytest.fixture
def image_dir(tmp_path):
    """Five random images of different sizes and formats, one corrupt .jpg and one non-image file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    sizes = [(40, 30), (50, 64), (33, 33), (64, 48), (45, 70)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ext = "png" if i % 2 == 0 else "jpg"
        path = folder / ("sub" if i == 4 else "") / f"img{i}.{ext}"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    (folder / "img9_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder, sorted([*paths, str(folder / "img9_broken.jpg")])


def all_samples(source: InputSource, indices=None) -> torch.Tensor:
    return torch.cat(list(source.batches(indices)))


# ---- Gaussian -------------------------------------------------------------------------------------------------


def shard(source: InputSource, rank: int) -> list[int]:
    """The micro-batches rank ``rank`` of two records (``spp.distributed.Context.shard``)."""
    return Context(rank=rank, world_size=2).shard(source.num_batches)


def test_gaussian_batches_are_reproducible_and_shard_exactly():
    source = GaussianInput((3, 4, 4), num_samples=10, batch_size=4, seed=7, std=2.0)
    assert source.num_batches == 3 and [len(source.batch_slice(j)) for j in range(3)] == [4, 4, 2]
    full = all_samples(source)
    torch.testing.assert_close(
        full[:4], torch.randn((4, 3, 4, 4), generator=torch.Generator().manual_seed(7 * 1_000_003)) * 2.0
    )
    shards = [shard(source, r) for r in range(2)]
    assert shards == [[0, 2], [1]]
    again = torch.cat([all_samples(source, [0]), all_samples(source, [1]), all_samples(source, [2])])
    assert torch.equal(again, full)
    assert source.describe()["input_std"] == 2.0


def test_make_input_gaussian_shape_from_the_model():
    vit = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}
    source = make_input(None, batch_size=3, data_config=vit)
    assert isinstance(source, GaussianInput) and source.shape == (1, 32, 32) and source.num_samples == 3
    assert make_input("gaussian", resolution=16, data_config=vit).shape == (1, 16, 16)
    assert make_input(None, shape=(3, 8, 8), num_samples=5, batch_size=2).num_batches == 3
    # One default resolution everywhere: the library's and the CLI's runs agree.
    from spp.run import RunConfig, default_resolution

    side = default_resolution(RunConfig(model="m"), {})
    assert side == DEFAULT_RESOLUTION == 128 and make_input(None).shape == (3, side, side)


# ---- images ---------------------------------------------------------------------------------------------------


def test_images_match_the_reference_preprocessing_and_skip_corrupt_files(image_dir):
    """Six image files, one corrupt: micro-batches of 2 are formed from the five readable ones, [2, 2, 1] (not
    [2, 2, 2] with a micro-batch of 1 where the corrupt file was), and the record says 1 was skipped."""
    folder, files = image_dir
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\), e.g. .*img9_broken.jpg: .*; using 5"):
        source = make_input(str(folder), batch_size=2, resolution=32, data_config=IMAGENET)
    assert isinstance(source, ImageInput) and source.files == files  # recursive, sorted, .txt ignored
    assert source.num_samples == 5 and source.num_batches == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing more to say while recording
        batches = list(source.batches())
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    ref = reference_transform(32, IMAGENET["mean"], IMAGENET["std"])
    readable = [f for f in files if "broken" not in f]
    for got, path in zip(torch.cat(batches), readable, strict=True):
        with Image.open(path) as im:
            expected = ref(im.convert("RGB"))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    described = source.describe()
    assert described["skipped_images"] == 1 and described["images_found"] == 6 and described["num_samples"] == 5


def test_micro_batches_hold_readable_images_only(tmp_path):
    """13 images, one corrupt in the middle, micro-batches of 4: 12 readable images make 3 full micro-batches
    (the corrupt one used to leave a micro-batch of 3 and a last one of 1); --num-samples 4 takes the first four
    readable ones, reading past the corrupt file."""
    rng = np.random.default_rng(1)
    for i in range(13):
        path = tmp_path / f"{i:02d}.png"
        if i == 2:
            path.write_bytes(b"broken")
        else:
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        source = make_input(str(tmp_path), batch_size=4, resolution=8)
    assert [b.shape[0] for b in source.batches()] == [4, 4, 4]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        first = make_input(str(tmp_path), batch_size=4, resolution=8, num_samples=4)
    assert first.used == [str(tmp_path / f"{i:02d}.png") for i in (0, 1, 3, 4)]


def test_images_use_the_model_data_config(image_dir):
    folder, _ = image_dir
    vit = {
        "input_size": (3, 24, 24),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    source = make_input(str(folder / "*.png"), batch_size=4, data_config=vit)  # a glob: img0, img2 only
    assert source.files == [str(folder / "img0.png"), str(folder / "img2.png")]
    got = all_samples(source)
    ref = reference_transform(24, vit["mean"], vit["std"], 0.9, T.InterpolationMode.BICUBIC)
    with Image.open(source.files[1]) as im:
        torch.testing.assert_close(got[1], ref(im.convert("RGB")), atol=1e-6, rtol=0)


def test_single_image_file_and_grey_model(image_dir):
    _, files = image_dir
    source = make_input(files[0], resolution=16, in_chans=1, data_config=IMAGENET)
    x = all_samples(source)
    assert x.shape == (1, 1, 16, 16)
    grey_mean, grey_std = sum(IMAGENET["mean"]) / 3, sum(IMAGENET["std"]) / 3
    ref = reference_transform(16, (grey_mean,), (grey_std,))
    with Image.open(files[0]) as im:
        torch.testing.assert_close(x[0], ref(im.convert("L")), atol=1e-6, rtol=0)


def test_image_shards_are_disjoint_and_complete(image_dir):
    folder, _ = image_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the corrupt file: left out before sharding
        source = make_input(str(folder), batch_size=1, resolution=8)
        full = all_samples(source)
        parts = [all_samples(source, shard(source, rank)) for rank in range(2)]
    assert shard(source, 0) == [0, 2, 4] and shard(source, 1) == [1, 3]
    assert [p.shape[0] for p in parts] == [3, 2] and full.shape[0] == 5
    pooled = torch.cat(parts)
    matches = [[i for i in range(len(pooled)) if torch.equal(pooled[i], row)] for row in full]
    assert sorted(m for found in matches for m in found) == list(range(5))  # each sample exactly once


def test_image_errors(tmp_path, image_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SppError, match=r"^--input .*empty: no image files"):
        make_input(str(empty))
    with pytest.raises(SppError, match=r"the pattern matches no file$"):
        make_input(str(tmp_path / "*.jpeg"))
    with pytest.raises(SppError, match=r"no such file or folder$"):
        make_input(str(tmp_path / "missing_dir"))
    broken = tmp_path / "only_broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    with pytest.raises(SppError, match=r"no usable image \(1 unreadable, e.g. .*a.png"):
        make_input(str(broken), resolution=8)
    folder, _ = image_dir
    with pytest.raises(SppError, match="images have 1 or 3 channels, the model expects 4"):
        make_input(str(folder), in_chans=4)


# ---- tensor files -------------------------------------------------------------------------------------------


def test_pt_and_npy_tensors_batch_and_shard(tmp_path):
    data = torch.randn(7, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pt, npy, wrapped = tmp_path / "x.pt", tmp_path / "x.npy", tmp_path / "w.pt"
    torch.save(data, str(pt))
    np.save(str(npy), data.numpy())
    torch.save({"inputs": data, "note": "calibration set"}, str(wrapped))
    for path in (pt, npy, wrapped):
        source = make_input(str(path), batch_size=3, data_config={"input_size": (3, 5, 5)})
        assert isinstance(source, TensorInput) and source.num_batches == 3
        batches = list(source.batches())
        assert [b.shape[0] for b in batches] == [3, 3, 1] and batches[0].dtype == torch.float32
        torch.testing.assert_close(torch.cat(batches), data.float())
        shards = [torch.cat(list(source.batches(shard(source, r)))) for r in range(2)]
        assert torch.equal(torch.cat([shards[0][:3], shards[1], shards[0][3:]]), torch.cat(batches))
    assert make_input(str(pt), num_samples=4, batch_size=8).num_samples == 4
    assert source.describe()["input_shape"] == [3, 5, 5]


def test_integer_tensors_keep_their_dtype(tmp_path):
    ids = torch.arange(12).reshape(4, 3)
    path = tmp_path / "ids.pt"
    torch.save(ids, str(path))
    got = all_samples(make_input(str(path), batch_size=2))
    assert got.dtype == torch.int64 and torch.equal(got, ids)


def test_tensor_file_errors(tmp_path):
    one_d, two, chans = tmp_path / "one_d.pt", tmp_path / "two.pt", tmp_path / "chans.npy"
    torch.save(torch.zeros(5), str(one_d))
    torch.save({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, str(two))
    np.save(str(chans), np.zeros((2, 4, 8, 8), dtype=np.float32))
    with pytest.raises(SppError, match=r"shape \(5,\) has no batch axis; expected \(N, C, H, W\) or \(N, \.\.\.\)"):
        make_input(str(one_d))
    with pytest.raises(SppError, match=r"a dict with exactly one tensor is needed; keys: a, b$"):
        make_input(str(two))
    with pytest.raises(SppError, match=r"shape \(2, 4, 8, 8\) has 4 channels, the model expects 3$"):
        make_input(str(chans), data_config={"input_size": (3, 8, 8)})
    objects = tmp_path / "obj.npy"
    np.save(str(objects), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SppError, match=r"holds Python objects \(dtype object\), which only unpickling can read"):
        make_input(str(objects))
    with pytest.raises(SppError, match=r"missing\.pt does not exist$"):
        make_input(str(tmp_path / "missing.pt"))
    with pytest.raises(SppError, match="holds a list, not a tensor"):
        torch.save([torch.zeros(2, 2)], str(one_d))
        make_input(str(one_d))

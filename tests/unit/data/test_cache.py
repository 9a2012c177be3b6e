"""The pre-resized image cache and its array transforms, against the PIL pipeline they replace."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from fixtures import class_image
from normsoftmax.data.cache import (
    ImageCache,
    array_eval_transform,
    array_train_transform,
    find_cache,
)
from normsoftmax.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransformConfig,
    eval_transform,
    load_rgb,
    train_transform,
)
from normsoftmax.data.records import DatasetRecords, ImageSet
from normsoftmax.prepare.cache import build_cache

SQUARE = ImageTransformConfig()
ASPECT = ImageTransformConfig(keep_aspect=True)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 8, 3))
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC),
                        dtype=np.float64)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8))


@pytest.fixture
def dataset(tmp_path):
    """Records over awkward images: tiny, photo-sized, grayscale, RGBA PNG, EXIF-rotated, odd aspect ratios."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []

    def save(image, name, **options):
        image.save(folder / name, **options)
        paths.append(str(folder / name))

    for k in range(4):
        save(class_image(k, k), f"small_{k}.jpg", quality=90)
    save(_photo(500, 375, 1), "photo_landscape.jpg", quality=90)
    save(_photo(375, 500, 2), "photo_portrait.jpg", quality=90)
    save(_photo(301, 263, 3), "odd.jpg", quality=90)
    save(_photo(320, 240, 4).convert("L"), "gray.jpg", quality=90)
    rgba = _photo(200, 150, 5).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (150, 1))))
    save(rgba, "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(_photo(400, 300, 6), "rotated.jpg", quality=90, exif=exif)
    half = len(paths) // 2
    return DatasetRecords("toy", str(tmp_path), ImageSet(paths[:half], np.arange(half) % 2, ["a", "b"]),
                          test=ImageSet(paths[half:], np.arange(len(paths) - half) % 2, ["c", "d"]))


def _reference(path: str, config: ImageTransformConfig) -> np.ndarray:
    return np.asarray(transforms.Resize(config.resize_size())(load_rgb(path)))


@pytest.mark.parametrize("config", [SQUARE, ASPECT], ids=["square", "keep_aspect"])
def test_cached_pixels_equal_decode_plus_resize_exactly(dataset, config):
    cache = find_cache(dataset, config)
    assert cache is None
    build_cache(dataset, config, workers=1, progress=False)
    cache = find_cache(dataset, config)
    assert cache is not None and len(cache) == len(dataset.all_paths())
    for path in dataset.all_paths():
        expected = _reference(path, config)
        got = cache.read(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), path
    rotated = cache.read(str(dataset.root) + "/images/rotated.jpg")
    assert rotated.shape[0] > rotated.shape[1] or config is SQUARE  # EXIF orientation applied before resizing


def test_parallel_build_gives_the_same_pixels(dataset, tmp_path):
    paths = dataset.all_paths() * 1
    extra = tmp_path / "many"
    extra.mkdir()
    for k in range(70):
        class_image(k, k, size=(60, 45)).save(extra / f"{k}.jpg", quality=90)
        paths.append(str(extra / f"{k}.jpg"))
    records = DatasetRecords("many", str(tmp_path), ImageSet(paths, np.arange(len(paths)) % 3, ["a", "b", "c"]),
                             test=ImageSet(paths[:2], [0, 1], ["a", "b"]))
    build_cache(records, SQUARE, workers=2, progress=False)
    cache = find_cache(records, SQUARE)
    for path in paths[::7]:
        assert np.array_equal(cache.read(path), _reference(path, SQUARE))


def test_read_is_a_zero_copy_view_of_the_memory_map(dataset):
    build_cache(dataset, SQUARE, workers=1, progress=False)
    cache = find_cache(dataset, SQUARE)
    pixels = cache.read(dataset.train.paths[0])
    assert np.shares_memory(pixels, cache.pixels) and isinstance(cache.pixels, np.memmap)
    assert not pixels.flags.writeable
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.read("/nowhere.jpg")


def test_cache_pickles_without_its_pixels(dataset):
    build_cache(dataset, SQUARE, workers=1, progress=False)
    cache = find_cache(dataset, SQUARE)
    cache.read(dataset.train.paths[0])  # open the memory map
    payload = pickle.dumps(cache)
    assert len(payload) < cache.nbytes / 10
    clone = pickle.loads(payload)
    assert np.array_equal(clone.read(dataset.test.paths[-1]), cache.read(dataset.test.paths[-1]))


@pytest.mark.parametrize("shape", [(256, 256), (256, 341), (341, 256), (257, 300), (224, 224), (200, 180)])
def test_eval_transform_equals_torchvision_center_crop(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    expected = eval_transform(SQUARE, resized=True)(Image.fromarray(pixels))
    got = array_eval_transform(SQUARE)(pixels)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("hflip", [True, False])
@pytest.mark.parametrize("shape", [(256, 256), (256, 341), (224, 224)])
def test_train_transform_equals_the_pil_pipeline_with_the_same_seed(shape, hflip):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    config = dataclasses.replace(SQUARE, hflip=hflip)
    reference, ours = train_transform(config, resized=True), array_train_transform(config)
    for seed in range(12):
        torch.manual_seed(seed)
        expected = reference(Image.fromarray(pixels))
        torch.manual_seed(seed)
        got = ours(pixels)
        assert got.shape == (3, 224, 224) and got.dtype == torch.float32
        assert torch.equal(got, expected), seed


def test_train_crop_is_uniform_over_valid_offsets_and_flips_half_the_time():
    height, width, crop = 6, 9, 4
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([rows * 20, cols * 20, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    transform = array_train_transform(ImageTransformConfig(resize=8, crop=crop))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.manual_seed(0)
    seen, flips, draws = {}, 0, 3000
    for _ in range(draws):
        values = torch.round((transform(pixels) * std + mean) * 255 / 20).to(torch.int64)
        top = int(values[0, 0, 0])
        first, last = int(values[1, 0, 0]), int(values[1, 0, -1])
        flipped = first > last
        left = last if flipped else first
        flips += flipped
        seen[(top, left)] = seen.get((top, left), 0) + 1
    assert set(seen) == {(i, j) for i in range(height - crop + 1) for j in range(width - crop + 1)}
    expected = draws / len(seen)
    assert all(abs(count - expected) < 0.35 * expected for count in seen.values())
    assert abs(flips / draws - 0.5) < 0.05


def test_normalisation_uses_imagenet_statistics():
    white = np.full((256, 256, 3), 255, dtype=np.uint8)
    out = array_eval_transform(SQUARE)(white)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 100, 100], expected)
    black = array_train_transform(SQUARE)(np.zeros((256, 256, 3), dtype=np.uint8))
    assert torch.allclose(black[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_crop_larger_than_the_image_is_refused_for_training():
    with pytest.raises(ValueError, match="larger than input image"):
        array_train_transform(SQUARE)(np.zeros((200, 300, 3), dtype=np.uint8))


def test_stale_cache_is_not_used(dataset):
    build_cache(dataset, SQUARE, workers=1, progress=False)
    assert find_cache(dataset, SQUARE) is not None
    assert find_cache(dataset, ASPECT) is None  # built for another resize
    target = dataset.train.paths[1]
    _photo(48, 40, 99).save(target, quality=90)  # the image changed on disk
    assert find_cache(dataset, SQUARE) is None
    build_cache(dataset, SQUARE, workers=1, progress=False)
    cache = find_cache(dataset, SQUARE)
    assert cache is not None and np.array_equal(cache.read(target), _reference(target, SQUARE))
    stat = os.stat(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: cannot be trusted
    assert find_cache(dataset, SQUARE) is None


def test_a_same_size_same_time_replacement_is_caught_by_content(dataset):
    """Archive extraction restores sizes and times: only the bytes tell a replaced image apart."""
    build_cache(dataset, SQUARE, workers=1, progress=False)
    target = dataset.train.paths[0]
    stat = os.stat(target)
    data = bytearray(Path(target).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    Path(target).write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(target).st_size == stat.st_size and os.stat(target).st_mtime_ns == stat.st_mtime_ns
    assert find_cache(dataset, SQUARE) is None


def test_cache_missing_an_image_is_not_used(dataset, tmp_path):
    build_cache(dataset, SQUARE, workers=1, progress=False)
    extra = tmp_path / "images" / "new.jpg"
    class_image(9, 9).save(extra, quality=90)
    grown = DatasetRecords("toy", dataset.root, ImageSet(dataset.train.paths + [str(extra)],
                                                         list(dataset.train.labels) + [0], ["a", "b"]),
                           test=dataset.test)
    assert find_cache(grown, SQUARE) is None
    assert find_cache(dataset, SQUARE) is not None


def test_truncated_pixel_file_is_not_used(dataset):
    directory = build_cache(dataset, SQUARE, workers=1, progress=False)
    pixels = directory / "pixels.u8"
    with open(pixels, "r+b") as handle:
        handle.truncate(pixels.stat().st_size - 10)
    assert find_cache(dataset, SQUARE) is None


def test_moved_dataset_keeps_its_cache(dataset, tmp_path):
    build_cache(dataset, SQUARE, workers=1, progress=False)
    moved_root = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved_root)
    relocate = lambda paths: [p.replace(str(tmp_path), str(moved_root), 1) for p in paths]  # noqa: E731
    records = DatasetRecords("toy", str(moved_root), ImageSet(relocate(dataset.train.paths), dataset.train.labels,
                                                              ["a", "b"]),
                             test=ImageSet(relocate(dataset.test.paths), dataset.test.labels, ["c", "d"]))
    cache = find_cache(records, SQUARE)
    assert isinstance(cache, ImageCache)
    assert np.array_equal(cache.read(records.test.paths[0]), _reference(records.test.paths[0], SQUARE))
    os.rename(moved_root, tmp_path)

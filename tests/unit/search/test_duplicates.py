"""Duplicate groups: every pair past the threshold (against brute force, both methods, float and binary), grouped;
and end to end from image files with planted duplicates -- re-encoded JPEGs, resized copies, crops -- found
exactly at the calibrated threshold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import tiny_config
from normsoftmax import train_embedder
from normsoftmax.model import register_backbone
from normsoftmax.search.duplicates import (
    binary_pairs_multi_index,
    binary_pairs_range_search,
    float_pairs_over,
    groups_of,
)
from normsoftmax.search.vectors import normalized


def _planted_codes(count: int, bits: int, groups: int, flips: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, (count, bits)).astype(bool)
    for g in range(groups):  # a few copies of item g, each with up to ``flips`` bits flipped
        for copy in range(2 + g % 3):
            target = groups + g * 4 + copy
            codes[target] = codes[g]
            codes[target, rng.choice(bits, rng.integers(0, flips + 1), replace=False)] ^= True
    return np.packbits(codes, axis=1)


def _brute_binary(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    unpacked = np.unpackbits(codes, axis=1).astype(np.int64)
    distance = (unpacked[:, None, :] != unpacked[None, :, :]).sum(axis=2)
    first, second = np.nonzero(np.triu(distance <= radius, k=1))
    return set(zip(first.tolist(), second.tolist(), strict=True))


@pytest.mark.parametrize(("bits", "radius"), [(256, 0), (256, 3), (256, 9), (256, 15), (136, 0), (136, 4)])
def test_multi_index_hashing_and_range_search_find_exactly_the_brute_force_pairs(bits, radius):
    # 136 bits = 17 bytes: chunks of 8 and 9 bytes at radius 0 (a 9-byte chunk is hashed), of 3 and 4 at radius 4
    codes = _planted_codes(600, bits, 40, flips=8)
    expected = _brute_binary(codes, radius)
    hashed = binary_pairs_multi_index(codes, radius)
    assert hashed is not None
    searched = binary_pairs_range_search(codes, radius)
    for first, second, distance in (hashed, searched):
        assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected
        assert (distance <= radius).all()
    assert binary_pairs_multi_index(codes, 200) is None  # chunks narrower than 2 bytes: not worth hashing
    first, second, _ = binary_pairs_range_search(codes, radius, queries=50)  # a sample: the first 50 as queries
    assert set(zip(first.tolist(), second.tolist(), strict=True)) == {pair for pair in expected if pair[0] < 50}


def test_float_pairs_are_exact_at_the_threshold():
    rng = np.random.default_rng(1)
    vectors = normalized(rng.standard_normal((300, 12)))
    vectors[10] = vectors[3]  # an exact twin: cosine 1
    exact = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    for threshold in (0.9, 0.75, float(np.sort(exact[np.triu_indices(300, 1)])[-50])):
        first, second, scores = float_pairs_over(vectors, threshold)
        expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(exact >= threshold, k=1)), strict=True)}
        assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected
        assert np.allclose(scores, exact[first, second])


def test_groups_are_the_connected_components():
    groups = groups_of(10, np.array([0, 1, 5, 7]), np.array([1, 2, 6, 8]))
    assert [g.tolist() for g in groups] == [[0, 1, 2], [5, 6], [7, 8]]
    assert groups_of(10, np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


# ------------------------------------------------------------------------------------------ end to end
@register_backbone("thumbnail_6x6")
def _thumbnail(pretrained: bool):
    """An embedder of coarse pixels (6 x 6 colour averages): what near-duplicate detection needs, and stable on
    every CPU, so the test is about finding and grouping pairs, not about a model's quality."""
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(6), torch.nn.Flatten(), torch.nn.Unflatten(1, (108, 1, 1)))
    return pooled, 108


def _scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((96, 128, 3)) + rng.integers(0, 256, 3)
    for _ in range(12):
        x0, y0 = rng.integers(0, 112), rng.integers(0, 80)
        pixels[y0:y0 + rng.integers(16, 48), x0:x0 + rng.integers(16, 60)] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def _with_copies(image: Image.Image, folder, name: str, harder: bool = False) -> list:
    """The image, a re-encoded JPEG of it, a resized copy and a crop (``harder``: lower quality, smaller, cut
    deeper -- the calibration set spans more than the collection's copies, so its threshold covers them)."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    image.save(folder / f"{name}_jpeg.jpg", quality=40 if harder else 60)
    image.resize((80, 60) if harder else (96, 72)).save(folder / f"{name}_small.png")
    image.crop((4, 4, 124, 92) if harder else (2, 2, 126, 94)).save(folder / f"{name}_crop.png")
    return sorted(folder.glob(f"{name}*"))


def test_planted_duplicates_are_found_exactly_at_the_calibrated_threshold(tmp_path, cli):
    # the run: trained on one set of scenes; its test split (other scenes, with their copies) calibrates it
    for scene in range(72):
        _with_copies(_scene(scene), tmp_path / "scenes" / f"s{scene:03d}", "v", harder=True)
    run = tmp_path / "run"
    train_embedder(tiny_config(tmp_path / "scenes", run, dataset="folder", model_name="thumbnail_6x6", dim=256,
                               num_steps=1, batch_size=4, images_per_class=2))
    assert cli("calibrate", run, "--workers", "0", "--no-progress", "--device", "cpu")[0] == 0
    assert (run / "calibration.json").is_file()
    # the collection: 15 scenes with three copies each, and 12 images without any
    collection = tmp_path / "collection"
    planted = [{str(p) for p in _with_copies(_scene(5000 + g), collection / f"g{g}", "v")} for g in range(15)]
    for single in range(12):
        _scene(9000 + single).save(collection / f"single{single}.png")
    assert cli("embed", run, collection, "--out", tmp_path / "c.npz", "--workers", "0", "--no-progress")[0] == 0
    code, out, _ = cli("index", "build", tmp_path / "c.npz", "--out", tmp_path / "index")
    assert code == 0
    assert json.loads((tmp_path / "index" / "index.json").read_text())["calibration"]["file"] == \
        str(run / "calibration.json")
    for kind in ("float", "binary"):
        out_file = tmp_path / f"{kind}.json"
        code, out, err = cli("duplicates", tmp_path / "index", "--calibrated", "--kind", kind, "--out", out_file)
        assert code == 0, err
        found = json.loads(out_file.read_text())
        groups = [{member["path"] for member in group["members"]} for group in found["groups"]]
        assert sorted(map(sorted, groups)) == sorted(map(sorted, planted)), (kind, found["threshold"])
        assert out_file.with_suffix(".csv").is_file() and "Group 0" in out_file.with_suffix(".html").read_text()
    code, out, _ = cli("duplicates", tmp_path / "index", "--threshold", "0.99999999", "--out", tmp_path / "none.json")
    assert code == 0 and "no duplicates" in out
    assert json.loads((tmp_path / "none.json").read_text())["groups"] == []
    assert "No duplicates at this threshold" in (tmp_path / "none.html").read_text()
    shutil.rmtree(tmp_path / "scenes")

"""The embedded glyph dataset: layout, determinism, caching, class choice, bad input."""

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normsoftmax.demo import glyphs
from normsoftmax.demo.glyphs import (
    MANIFEST_NAME,
    candidate_classes,
    generate_glyph_dataset,
    read_manifest,
    render_glyph_image,
    select_classes,
)

SMALL = dict(num_classes=12, images_per_class=3, image_size=32, seed=0, workers=1, progress=False)

# Pairs that read as the same symbol; at most one of each may be a class.
HOMOGLYPHS = [
    "AΑА", "BΒВ", "CСϹ", "EΕЕ", "HΗН", "IΙІӀ", "JЈ", "KΚК", "MΜМ", "NΝ", "OΟО0oοо", "PΡР", "SЅ", "TΤТ",
    "XΧХ", "YΥҮ", "ZΖ", "aа", "cс", "eе", "iі", "jј", "pрρ", "sѕ", "xхχ×", "yу", "lI1|", "Oo", "Cc", "Ss",
    "Vv", "Ww", "Xx", "Zz", "Кк", "Шш", "Σ∑", "Π∏", "Δ∆", "∈ϵ", "Ø∅", "ɛε", "<‹", ">›", "gɡ", "3З",
    "ɑα", "∧Λ", "·•", "■▪", "□◻", "△▵", "▷⊳", "◁⊲", "∇▽", "ßβ", "♯#",
]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_glyph_dataset(tmp_path_factory.mktemp("glyphs") / "data", **SMALL)


def test_layout_counts_and_manifest(small):
    manifest = json.loads((small / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["params"] == {"num_classes": 12, "images_per_class": 3, "image_size": 32, "seed": 0}
    assert manifest["generator_version"] == glyphs.GENERATOR_VERSION
    assert manifest["num_files"] == 36
    assert sorted(p.name for p in small.iterdir()) == sorted(["train", "test", MANIFEST_NAME])
    train = sorted(p.name for p in (small / "train").iterdir())
    test = sorted(p.name for p in (small / "test").iterdir())
    assert len(train) == len(test) == 6
    for name in train + test:
        assert re.fullmatch(r"\d{4}_U\+[0-9A-F]{4,6}", name)
        split = "train" if name in train else "test"
        assert sorted(p.name for p in (small / split / name).iterdir()) == ["00.png", "01.png", "02.png"]
    # folder names sort in generation order; the first half of the classes trains
    entries = manifest["classes"]
    assert [e["folder"] for e in entries] == [f"train/{n}" for n in train] + [f"test/{n}" for n in test]
    for entry in entries:
        assert entry["codepoint"] == f"U+{ord(entry['char']):04X}"
        assert entry["folder"].endswith(entry["codepoint"])
        assert len(entry["fonts"]) >= 2
    # train and test classes are disjoint characters
    by_split = {split: {e["char"] for e in entries if e["split"] == split} for split in ("train", "test")}
    assert len(by_split["train"]) == len(by_split["test"]) == 6
    assert not by_split["train"] & by_split["test"]


def test_folder_reader_reads_it(small):
    from normsoftmax.data.registry import load_dataset

    records = load_dataset("folder", small)
    assert len(records.train) == 18 and len(records.test) == 18
    assert records.train.num_classes == 6 and records.test.num_classes == 6
    assert not set(records.train.class_names) & set(records.test.class_names)


def test_images_are_rgb_of_the_right_size_and_show_a_glyph(small):
    for path in small.rglob("*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
            pixels = np.asarray(image, np.float32)
        luminance = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
        assert np.percentile(luminance, 98) - np.percentile(luminance, 2) > 60, path  # stroke vs background


def test_glyph_fills_most_of_the_image():
    rng_classes = select_classes(24)
    for glyph in rng_classes:
        for index in range(4):
            rng = np.random.default_rng([0, glyph.codepoint, index, glyphs.GENERATOR_VERSION])
            alpha = glyphs._coverage_image(glyph, rng, 64)
            ys, xs = np.nonzero(alpha > 0.5)
            assert ys.size > 0.02 * alpha.size, glyph.char  # glyph pixels present
            extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
            assert extent >= 0.65 * 64, (glyph.char, extent)
            assert ys.min() >= 0 and ys.max() < 64 and xs.min() >= 0 and xs.max() < 64


def test_same_seed_is_byte_identical_and_parallel_matches_serial(small, tmp_path):
    again = generate_glyph_dataset(tmp_path / "again", **{**SMALL, "workers": 2})
    first, second = _files(small), _files(again)
    assert len(first) == 36 and first == second
    other = _files(generate_glyph_dataset(tmp_path / "other", **{**SMALL, "seed": 1}))
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) == len(first)


def test_image_depends_on_seed_class_and_index_only():
    a, b = select_classes(6)[:2]
    assert np.array_equal(render_glyph_image(a, 3, 7, 32), render_glyph_image(a, 3, 7, 32))
    assert not np.array_equal(render_glyph_image(a, 3, 7, 32), render_glyph_image(a, 4, 7, 32))
    assert not np.array_equal(render_glyph_image(a, 3, 7, 32), render_glyph_image(b, 3, 7, 32))


def test_cached_dataset_is_not_rewritten(tmp_path, monkeypatch):
    root = generate_glyph_dataset(tmp_path / "data", **SMALL)
    before = _mtimes(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(glyphs, "select_classes", fail)
    assert generate_glyph_dataset(root, **{**SMALL, "workers": 2, "progress": True}) == root
    assert _mtimes(root) == before
    monkeypatch.undo()

    # a changed parameter regenerates, replacing the old files
    generate_glyph_dataset(root, **{**SMALL, "images_per_class": 4})
    assert read_manifest(root)["params"]["images_per_class"] == 4
    assert len(_files(root)) == 48
    assert all(len(list(folder.iterdir())) == 4 for folder in root.glob("*/*"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.") and p.is_dir()] == []


def test_interrupted_generation_is_redone(tmp_path):
    root = generate_glyph_dataset(tmp_path / "data", **SMALL)
    expected = _files(root)
    # as if killed mid-way: some images missing and no manifest written yet
    (root / MANIFEST_NAME).unlink()
    victim = sorted((root / "test").iterdir())[-1]
    for image in victim.iterdir():
        image.unlink()
    stale = tmp_path / ".data.tmp-killed"  # a killed run's staging folder
    (stale / "train").mkdir(parents=True)
    assert read_manifest(root) is None
    generate_glyph_dataset(root, **SMALL)
    assert read_manifest(root)["num_files"] == 36
    assert _files(root) == expected
    assert not stale.exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_glyph_dataset(root, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"


def test_default_candidates_are_many_and_distinct():
    pool = candidate_classes()
    assert len(pool) >= 400
    chars = [g.char for g in pool]
    assert len(set(chars)) == len(chars)
    kept = set(chars)
    for group in HOMOGLYPHS:
        assert len(kept & set(group)) <= 1, (group, sorted(kept & set(group)))
    for char in chars:
        assert unicodedata.category(char)[0] in "LNPS"  # no marks, spaces, controls
        assert not unicodedata.decomposition(char)
    for thin in ".,-'_|l:;`\"":
        assert thin not in kept
    # the default selection: 400 different characters, both halves mixing scripts and symbols
    chosen = select_classes(400)
    assert len({g.codepoint for g in chosen}) == 400
    train_groups = {g.group for g in chosen[:200]}
    test_groups = {g.group for g in chosen[200:]}
    assert train_groups == test_groups and len(train_groups) >= 8
    assert select_classes(400) == chosen  # deterministic


def test_every_face_of_a_class_has_the_character():
    from fontTools.ttLib import TTFont

    cmaps = {}
    for name, file, allowed in glyphs.FONT_FACES:
        path = glyphs.font_directory() / file
        if path.is_file():
            with TTFont(str(path), lazy=True) as font:
                cmaps[name] = (set(font.getBestCmap()), allowed)
    for glyph in candidate_classes():
        assert len(glyph.faces) >= glyphs.MIN_FACES >= 2
        assert len(set(glyph.faces)) == len(glyph.faces)
        for face in glyph.faces:
            cmap, allowed = cmaps[face]
            assert glyph.codepoint in cmap, (glyph.char, face)
            assert allowed is None or glyph.codepoint in allowed, (glyph.char, face)
    # and draws ink in every face (no empty glyphs) for the default classes
    for glyph in select_classes(400):
        for face in glyph.faces:
            assert glyphs._ink(glyph.char, glyphs._font(face, 32)) is not None, (glyph.char, face)


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 10 ** 6}, "only"),
    ({"num_classes": 3}, "at least 4"),
    ({"images_per_class": 1}, "at least 2"),
    ({"image_size": 8}, "image_size"),
    ({"image_size": 4096}, "image_size"),
    ({"seed": -1}, "seed"),
    ({"workers": 0}, "workers"),
    ({"num_classes": 12.5}, "integer"),
    ({"image_size": True}, "integer"),
])
def test_bad_parameters_raise(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        generate_glyph_dataset(tmp_path / "data", **{**SMALL, **change})
    assert not (tmp_path / "data").exists()


def test_contact_sheet(small, tmp_path):
    path = glyphs.make_contact_sheet(small, tmp_path / "sheet.png", num_classes=4, images_per_class=3)
    with Image.open(path) as sheet:
        assert sheet.size == (3 * 32, 4 * 32)

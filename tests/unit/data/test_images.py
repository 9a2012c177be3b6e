import numpy as np
import pytest
import torch
from PIL import Image

from normsoftmax.data.images import (
    ImageDataset,
    ImageTransformConfig,
    eval_transform,
    find_bad_images,
    load_rgb,
    train_transform,
    verify_images,
)
from normsoftmax.data.records import DatasetError


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)  # width and height swapped
    top = np.asarray(loaded)[:20].mean()
    bottom = np.asarray(loaded)[20:].mean()
    assert top > 200 and bottom < 50  # the white half now on top


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")
    Image.new("RGB", (8, 6), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    for name, expected in [("gray.png", (77, 77, 77)), ("palette.png", (10, 200, 30)), ("cmyk.jpg", (255, 0, 0))]:
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB"
        np.testing.assert_allclose(np.asarray(image)[3, 3], expected, atol=3)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(load_rgb(tmp_path / "alpha.png"))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[3, 3]) == (255, 255, 255)


def test_sixteen_bit_values_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_bad_images_are_named(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    paths = [str(good), str(tmp_path / "truncated.jpg"), str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg")]
    bad = dict(find_bad_images(paths, workers=1))
    assert set(bad) == set(paths[1:])
    assert bad[str(tmp_path / "missing.jpg")] == "missing"
    with pytest.raises(DatasetError, match="truncated.jpg"):
        verify_images(paths, workers=1)


def test_transforms_follow_the_recipe():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    torch.manual_seed(0)
    train = train_transform()(image)
    evaluated = eval_transform()(image)
    assert train.shape == evaluated.shape == (3, 224, 224)
    # eval = Resize((256, 256)) then the central 224 crop, ImageNet-normalised
    resized = np.asarray(image.resize((256, 256), Image.BILINEAR), dtype=np.float32)[16:240, 16:240] / 255
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(evaluated.permute(1, 2, 0).numpy(), expected, atol=1e-4)
    no_flip = train_transform(ImageTransformConfig(resize=64, crop=64, hflip=False))
    small = image.resize((64, 64), Image.BILINEAR)
    assert torch.equal(no_flip(small), no_flip(small))


def test_dataset_names_a_file_that_fails_late(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    dataset = ImageDataset([str(tmp_path / "bad.jpg")], [0], eval_transform())
    with pytest.raises(DatasetError, match="bad.jpg"):
        dataset[0]

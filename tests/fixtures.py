"""Tiny datasets written in the four benchmarks' exact official layouts (see shared DATASETS.md).

Images are small JPEGs whose colour and pattern depend on the class, so a
model can tell classes apart; every writer returns the folder a user would
pass as ``--dataset_root`` (the folder the official archive extracts into).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def class_image(class_index: int, image_index: int, size=(48, 40), seed: int = 0) -> Image.Image:
    """A JPEG-friendly picture: a class-specific colour and stripe frequency, plus per-image noise."""
    rng = np.random.default_rng([seed, class_index, image_index])
    width, height = size
    hue = np.array([(class_index * 67) % 256, (class_index * 151) % 256, (class_index * 29 + 90) % 256],
                   dtype=np.float64)
    x = np.arange(width)[None, :, None]
    stripes = 60 * np.sin(x * (0.2 + 0.15 * (class_index % 5)))
    pixels = hue[None, None, :] + stripes + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_cub200(root: Path, num_classes: int = 8, images_per_class: int = 3) -> Path:
    base = Path(root) / "CUB_200_2011"
    (base / "images").mkdir(parents=True, exist_ok=True)
    images, labels, classes, split, boxes = [], [], [], [], []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        (base / "images" / folder).mkdir(exist_ok=True)
        for k in range(images_per_class):
            image_id += 1
            relative = f"{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            class_image(class_id, k).save(base / "images" / relative, quality=90)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {k % 2}")
            boxes.append(f"{image_id} 1.0 2.0 30.0 25.0")
    for name, lines in [("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes)]:
        (base / name).write_text("\n".join(lines) + "\n")
    (Path(root) / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n")
    return base


def write_cars196(root: Path, num_classes: int = 8, images_per_class: int = 3) -> Path:
    from scipy.io import savemat

    base = Path(root)
    (base / "car_ims").mkdir(parents=True, exist_ok=True)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    count = num_classes * images_per_class
    # savemat writes a numpy structured array of object fields as a MATLAB struct array, as in the real file.
    annotations = np.zeros((1, count), dtype=[(f, "O") for f in fields])
    number = 0
    for class_id in range(1, num_classes + 1):
        for k in range(images_per_class):
            relative = f"car_ims/{number + 1:06d}.jpg"
            class_image(class_id, k).save(base / relative, quality=90)
            annotations[0, number] = (np.array([relative]), np.array([[1]], dtype=np.uint8), np.array([[2]],
                                                                                                      dtype=np.uint8),
                                      np.array([[40]], dtype=np.uint8), np.array([[30]], dtype=np.uint8),
                                      np.array([[class_id]], dtype=np.uint8), np.array([[k % 2]], dtype=np.uint8))
            number += 1
    class_names = np.empty((1, num_classes), dtype=object)
    for index in range(num_classes):
        class_names[0, index] = np.array([f"Make Model {index + 1} 2012"])
    savemat(str(base / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return base


def write_sop(root: Path, train_classes: int = 6, test_classes: int = 6, images_per_class: int = 3) -> Path:
    base = Path(root) / "Stanford_Online_Products"
    supers = ["bicycle", "chair"]
    rows = {"train": [], "test": []}
    image_id = 0
    for class_id in range(1, train_classes + test_classes + 1):
        split = "train" if class_id <= train_classes else "test"
        super_id = 1 + class_id % len(supers)
        folder = f"{supers[super_id - 1]}_final"
        (base / folder).mkdir(parents=True, exist_ok=True)
        for k in range(images_per_class):
            image_id += 1
            relative = f"{folder}/{111085122871 + class_id}_{k}.JPG"
            class_image(class_id, k).save(base / relative, format="JPEG", quality=90)
            rows[split].append(f"{image_id} {class_id} {super_id} {relative}")
    header = "image_id class_id super_class_id path"
    (base / "Ebay_train.txt").write_text("\n".join([header] + rows["train"]) + "\n")
    (base / "Ebay_test.txt").write_text("\n".join([header] + rows["test"]) + "\n")
    header = "image_id class_id super_class_id path"
    (base / "Ebay_info.txt").write_text("\n".join([header] + rows["train"] + rows["test"]) + "\n")
    return base


def write_inshop(root: Path, train_items: int = 6, test_items: int = 6, images_per_item: int = 4) -> Path:
    base = Path(root)
    lines = []
    for item in range(1, train_items + test_items + 1):
        item_id = f"id_{item:08d}"
        folder = base / "img" / "WOMEN" / "Dresses" / item_id
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_item):
            relative = f"img/WOMEN/Dresses/{item_id}/{k + 1:02d}_{k + 1}_front.jpg"
            class_image(item, k).save(base / relative, quality=90)
            status = "train" if item <= train_items else "query" if k % 2 == 0 else "gallery"
            # The official file pads columns with runs of spaces.
            lines.append(f"{relative:<70} {item_id} {status}")
    (base / "Eval").mkdir(parents=True, exist_ok=True)
    header = "image_name item_id evaluation_status"
    (base / "Eval" / "list_eval_partition.txt").write_text("\n".join([str(len(lines)), header] + lines) + "\n")
    return base


def write_folder(root: Path, num_classes: int = 8, images_per_class: int = 3, split_folders: bool = False) -> Path:
    base = Path(root)
    for class_index in range(num_classes):
        parent = base
        if split_folders:
            parent = base / ("train" if class_index < num_classes // 2 else "test")
        folder = parent / f"class_{class_index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_class):
            class_image(class_index, k).save(folder / f"{k}.jpg", quality=90)
    return base


WRITERS = {"cub200": write_cub200, "cars196": write_cars196, "sop": write_sop, "inshop": write_inshop,
           "folder": write_folder}


# A few steps of a tiny network: the command-line flags, and the same as a TrainConfig.
TINY = ["--model_name", "resnet18", "--weights", "none", "--dim", "32", "--batch_size", "8", "--images_per_class", "2",
        "--epochs_per_step", "1", "--num_steps", "1", "--pretrain_epochs", "1", "--resize", "40", "--crop", "32",
        "--workers", "0", "--no-progress", "--amp", "none"]  # one precision on every CPU


def tiny_config(root, run_dir, **extra):
    from normsoftmax import TrainConfig

    values = dict(dataset="Cub200", dataset_root=str(root), run_dir=str(run_dir) if run_dir else None,
                  model_name="resnet18", weights="none",
                  dim=16, batch_size=8, images_per_class=2, class_balancing=True, pretrain_epochs=1, epochs_per_step=1,
                  num_steps=2, test_every_n_epochs=2, resize=36, crop=32, workers=0, progress=False, lr=0.01,
                  amp="none")
    values.update(extra)
    return TrainConfig(**values)

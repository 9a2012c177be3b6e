"""Users' own data: a folder per class, or a CSV of ``path,label[,split]``.

Folder layout: ``DIR/train/<class>/`` and ``DIR/test/<class>/`` when both
exist; otherwise ``DIR/<class>/`` with the classes sorted by name and split in
half, the first half for training (the benchmarks' protocol: retrieval is
evaluated on classes never seen in training).

CSV: a header row naming ``path`` and ``label`` (and optionally ``split``).
Split values ``train``/``test`` give leave-one-out evaluation on the test rows;
``train``/``query``/``gallery`` give query-against-gallery evaluation, query
and gallery sharing one label space. Without a split column the classes are
split in half as for folders. Relative paths resolve against the CSV's folder.

Users' images are decoded robustly (EXIF orientation applied, alpha composited on
white, 16-bit scaled; see :func:`normsoftmax.data.images.load_rgb`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .records import DatasetError, DatasetRecords, ImageSet, remap_shared
from .registry import DatasetSpec

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _class_folders(directory: Path) -> list[Path]:
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{directory}: no class folders (expected one sub-folder per class)")
    return folders


def _images_of(folder: Path) -> list[str]:
    images = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DatasetError(f"{folder}: empty class folder (no image files with extensions {sorted(IMAGE_EXTENSIONS)})")
    return images


def _image_set(folders: list[Path]) -> ImageSet:
    paths, labels = [], []
    for label, folder in enumerate(folders):
        images = _images_of(folder)
        paths.extend(images)
        labels.extend([label] * len(images))
    return ImageSet(paths, np.asarray(labels, dtype=np.int64), [folder.name for folder in folders])


def load_folder(root: str | os.PathLike) -> DatasetRecords:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _image_set(_class_folders(root / "train"))
        test = _image_set(_class_folders(root / "test"))
    else:
        folders = _class_folders(root)
        if len(folders) < 4:
            raise DatasetError(f"{root}: {len(folders)} class folders; splitting classes in half needs at least 4 "
                               f"(or provide train/ and test/ sub-folders)")
        half = len(folders) // 2
        train, test = _image_set(folders[:half]), _image_set(folders[half:])
    return DatasetRecords("folder", str(root), train, test=test)


FOLDER = DatasetSpec(name="folder", title="a folder per class", read=load_folder)


def load_csv(path: str | os.PathLike) -> DatasetRecords:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found")
    try:
        return _read_csv(path)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error})") from None


def _read_csv(path: Path) -> DatasetRecords:
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets often write a BOM
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise DatasetError(f"{path}, line 1: the header must name the columns path and label (and optionally "
                               f"split), found {header}")
        column = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        rows = []
        for fields in reader:
            number = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DatasetError(f"{path}, line {number}: expected {len(header)} fields, found {len(fields)}")
            image = Path(fields[column["path"]].strip())
            label = fields[column["label"]].strip()
            split = fields[column["split"]].strip().lower() if "split" in column else ""
            if not label:
                raise DatasetError(f"{path}, line {number}: empty label")
            if split not in ("", "train", "test", "query", "gallery"):
                raise DatasetError(f"{path}, line {number}: split {split!r} is not train, test, query or gallery")
            rows.append((str(image if image.is_absolute() else base / image), label, split))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    splits = {split for _, _, split in rows}
    by_split = {name: ([p for p, _, s in rows if s == name], [lab for _, lab, s in rows if s == name])
                for name in splits}
    if splits == {""}:
        classes = sorted({label for _, label, _ in rows})
        if len(classes) < 4:
            raise DatasetError(f"{path}: {len(classes)} classes; splitting classes in half needs at least 4 (or add a "
                               "split column)")
        train_classes = set(classes[: len(classes) // 2])
        train = ImageSet.from_raw([p for p, lab, _ in rows if lab in train_classes],
                                  [lab for _, lab, _ in rows if lab in train_classes])
        test = ImageSet.from_raw([p for p, lab, _ in rows if lab not in train_classes],
                                 [lab for _, lab, _ in rows if lab not in train_classes])
        return DatasetRecords("csv", str(path), train, test=test)
    if "" in splits:
        raise DatasetError(f"{path}: some rows have an empty split; give every row a split or none")
    if "train" not in splits:
        raise DatasetError(f"{path}: no rows with split 'train'")
    train = ImageSet.from_raw(*by_split["train"])
    if splits == {"train", "test"}:
        return DatasetRecords("csv", str(path), train, test=ImageSet.from_raw(*by_split["test"]))
    if splits == {"train", "query", "gallery"}:
        query, gallery = remap_shared([by_split["query"], by_split["gallery"]])
        return DatasetRecords("csv", str(path), train, query=query, gallery=gallery)
    raise DatasetError(f"{path}: splits {sorted(splits)} — use train+test (leave-one-out) or train+query+gallery")


CSV = DatasetSpec(name="csv", title="a CSV of path,label[,split]", read=load_csv)

# Users' own data; the package registers these (normsoftmax/data/__init__.py).
SPECS = (FOLDER, CSV)

"""Readers for the four metric-learning benchmarks, in their official layouts.

Each reader takes the dataset root (the folder the official archive extracts
to, or the folder holding it) and returns :class:`DatasetRecords`. The splits
are the metric-learning ones, not the datasets' classification splits:

- CUB-200-2011: classes 1-100 train, 101-200 test (``train_test_split.txt`` ignored).
- Cars196: classes 1-98 train, 99-196 test (the ``test`` flag in ``cars_annos.mat`` ignored).
- Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt``.
- In-Shop: ``list_eval_partition.txt`` (train / query / gallery; query and gallery share labels).

For CUB and Cars the boundary is "the first half of the class ids", which is
exactly 100 and 98 on the real data and lets small fixtures in the same
layout split the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .records import DatasetError, DatasetRecords, ImageSet, remap_shared

# The counts every metric-learning paper uses; `prepare` and the training log compare against them.
REFERENCE_COUNTS: dict[str, dict[str, dict[str, int]]] = {
    "cub200": {"train": {"images": 5864, "classes": 100}, "test": {"images": 5924, "classes": 100}},
    "cars196": {"train": {"images": 8054, "classes": 98}, "test": {"images": 8131, "classes": 98}},
    "sop": {"train": {"images": 59551, "classes": 11318}, "test": {"images": 60502, "classes": 11316}},
    "inshop": {"train": {"images": 25882, "classes": 3997}, "query": {"images": 14218, "classes": 3985},
               "gallery": {"images": 12612, "classes": 3985}},
}

# The reference script's --dataset names, and the short names used by `prepare` and the recipes.
DATASET_ALIASES = {
    "cub200": "cub200", "cub": "cub200", "cub_200_2011": "cub200",
    "cars196": "cars196", "cars": "cars196",
    "stanfordonlineproducts": "sop", "sop": "sop", "stanford_online_products": "sop",
    "inshop": "inshop", "in-shop": "inshop", "in_shop": "inshop",
    "folder": "folder", "csv": "csv",
}


def canonical_dataset_name(name: str) -> str:
    try:
        return DATASET_ALIASES[name.lower()]
    except KeyError:
        known = "Cub200, Cars196, StanfordOnlineProducts, InShop, folder, csv"
        raise DatasetError(f"unknown dataset {name!r}; choose one of {known}") from None


def load_dataset(name: str, root: str | os.PathLike) -> DatasetRecords:
    """Read any supported dataset by name (reference-script or short name)."""
    from .custom import load_csv, load_folder

    readers = {"cub200": load_cub200, "cars196": load_cars196, "sop": load_sop, "inshop": load_inshop,
               "folder": load_folder, "csv": load_csv}
    canonical = canonical_dataset_name(name)
    records = readers[canonical](root)
    records.check_trainable(str(records.root))
    if canonical in REFERENCE_COUNTS:
        records.notes.extend(compare_with_reference(canonical, records))
    return records


def compare_with_reference(name: str, records: DatasetRecords) -> list[str]:
    """Human-readable differences between the loaded counts and the published ones (empty when equal)."""
    differences = []
    counts = records.counts()
    for split, expected in REFERENCE_COUNTS[name].items():
        found = counts.get(split, {"images": 0, "classes": 0})
        for key in ("images", "classes"):
            if found[key] != expected[key]:
                differences.append(f"{name} {split}: {found[key]} {key}, the reference count is {expected[key]}")
    return differences


def _find_root(root: str | os.PathLike, marker: str, subfolder: str) -> Path:
    """Accept either the extracted folder itself or the folder that holds it."""
    root = Path(root).expanduser()
    for candidate in (root, root / subfolder):
        if (candidate / marker).is_file():
            return candidate.resolve()
    raise DatasetError(f"{root}: {marker} not found here or in {root / subfolder}; "
                       f"point --dataset_root at the extracted {subfolder} folder")


def _read_table(path: Path, num_fields: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows with an exact field count, as (line number, fields)."""
    rows = []
    if not path.is_file():
        raise DatasetError(f"{path}: metadata file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if number <= skip or not line.strip():
            continue
        fields = line.split()
        if len(fields) != num_fields:
            raise DatasetError(f"{path}, line {number}: expected {num_fields} fields, found {len(fields)}: {line.rstrip()!r}")
        rows.append((number, fields))
    if not rows:
        raise DatasetError(f"{path}: no entries")
    return rows


def _as_int(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{path}, line {number}: {text!r} is not an integer") from None


def _split_by_class_half(paths: list[str], class_ids: list[int], names: dict, source: Path) -> tuple[ImageSet, ImageSet]:
    ordered = sorted(set(class_ids))
    if len(ordered) < 4:
        raise DatasetError(f"{source}: only {len(ordered)} classes found; the class-half split needs at least 4")
    train_classes = set(ordered[: len(ordered) // 2])
    train = [(p, c) for p, c in zip(paths, class_ids) if c in train_classes]
    test = [(p, c) for p, c in zip(paths, class_ids) if c not in train_classes]
    return (ImageSet.from_raw([p for p, _ in train], [c for _, c in train], names),
            ImageSet.from_raw([p for p, _ in test], [c for _, c in test], names))


def load_cub200(root: str | os.PathLike) -> DatasetRecords:
    base = _find_root(root, "images.txt", "CUB_200_2011")
    images = {}
    for number, (image_id, relative) in _read_table(base / "images.txt", 2):
        images[_as_int(base / "images.txt", number, image_id)] = relative
    labels = {}
    for number, (image_id, class_id) in _read_table(base / "image_class_labels.txt", 2):
        labels[_as_int(base / "image_class_labels.txt", number, image_id)] = _as_int(base / "image_class_labels.txt", number, class_id)
    names = {}
    for number, (class_id, name) in _read_table(base / "classes.txt", 2):
        names[_as_int(base / "classes.txt", number, class_id)] = name
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DatasetError(f"{base / 'image_class_labels.txt'}: no class for image id {missing[0]} "
                           f"({images[missing[0]]}) listed in images.txt ({len(missing)} missing)")
    unknown = sorted(set(labels.values()) - set(names))
    if unknown:
        raise DatasetError(f"{base / 'classes.txt'}: class id {unknown[0]} used in image_class_labels.txt is not listed")
    ids = sorted(images)
    paths = [str(base / "images" / images[i]) for i in ids]
    train, test = _split_by_class_half(paths, [labels[i] for i in ids], names, base / "image_class_labels.txt")
    return DatasetRecords("cub200", str(base), train, test=test)


def load_cars196(root: str | os.PathLike) -> DatasetRecords:
    from scipy.io import loadmat

    base = _find_root(root, "cars_annos.mat", "cars196")
    mat_path = base / "cars_annos.mat"
    try:
        mat = loadmat(str(mat_path))
    except Exception as error:  # scipy raises several types for a damaged file
        raise DatasetError(f"{mat_path}: cannot be read as a MATLAB file ({error})") from None
    if "annotations" not in mat or "class_names" not in mat:
        raise DatasetError(f"{mat_path}: expected the variables 'annotations' and 'class_names'")
    annotations = np.ravel(mat["annotations"])
    fields = annotations.dtype.names or ()
    for required in ("relative_im_path", "class"):
        if required not in fields:
            raise DatasetError(f"{mat_path}: the annotations struct has no field {required!r} (fields: {fields})")
    class_names = {index + 1: str(np.ravel(cell)[0]) for index, cell in enumerate(np.ravel(mat["class_names"]))}
    paths, class_ids = [], []
    for number, entry in enumerate(annotations, start=1):
        try:
            relative = str(np.ravel(entry["relative_im_path"])[0])
            class_id = int(np.ravel(entry["class"])[0])
        except (IndexError, TypeError, ValueError):
            raise DatasetError(f"{mat_path}: annotation {number} has an empty or malformed relative_im_path or class") from None
        if class_id not in class_names:
            raise DatasetError(f"{mat_path}: annotation {number} ({relative}) has class {class_id}, "
                               f"outside the {len(class_names)} class_names")
        paths.append(str(base / relative))
        class_ids.append(class_id)
    train, test = _split_by_class_half(paths, class_ids, class_names, mat_path)
    return DatasetRecords("cars196", str(base), train, test=test)


def _read_ebay(path: Path, base: Path) -> tuple[list[str], list[int]]:
    rows = _read_table(path, 4, skip=1)
    header = path.read_text(encoding="utf-8").split("\n", 1)[0].split()
    if header != ["image_id", "class_id", "super_class_id", "path"]:
        raise DatasetError(f"{path}, line 1: expected the header 'image_id class_id super_class_id path', found {' '.join(header)!r}")
    paths = [str(base / fields[3]) for _, fields in rows]
    class_ids = [_as_int(path, number, fields[1]) for number, fields in rows]
    return paths, class_ids


def load_sop(root: str | os.PathLike) -> DatasetRecords:
    base = _find_root(root, "Ebay_train.txt", "Stanford_Online_Products")
    train = ImageSet.from_raw(*_read_ebay(base / "Ebay_train.txt", base))
    test = ImageSet.from_raw(*_read_ebay(base / "Ebay_test.txt", base))
    return DatasetRecords("sop", str(base), train, test=test)


def load_inshop(root: str | os.PathLike) -> DatasetRecords:
    root = Path(root).expanduser()
    candidates = [root / "Eval" / "list_eval_partition.txt", root / "list_eval_partition.txt"]
    partition = next((c for c in candidates if c.is_file()), None)
    if partition is None:
        raise DatasetError(f"{root}: list_eval_partition.txt not found (looked for {candidates[0]} and {candidates[1]})")
    base = root.resolve()
    rows = _read_table(partition, 3, skip=2)  # reads (and checks the encoding of) the whole file first
    first, header = (partition.read_text(encoding="utf-8").split("\n") + ["", ""])[:2]
    first, header = first.strip(), header.split()
    if not first.isdigit():
        raise DatasetError(f"{partition}, line 1: expected the number of images, found {first!r}")
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetError(f"{partition}, line 2: expected the header 'image_name item_id evaluation_status'")
    if len(rows) != int(first):
        raise DatasetError(f"{partition}, line 1: announces {first} images but {len(rows)} are listed")
    grouped: dict[str, tuple[list[str], list[str]]] = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    for number, (image_name, item_id, status) in rows:
        if status not in grouped:
            raise DatasetError(f"{partition}, line {number}: evaluation_status {status!r} is not train, query or gallery")
        grouped[status][0].append(str(base / image_name))
        grouped[status][1].append(item_id)
    train = ImageSet.from_raw(*grouped["train"])
    query, gallery = remap_shared([grouped["query"], grouped["gallery"]])
    return DatasetRecords("inshop", str(base), train, query=query, gallery=gallery)

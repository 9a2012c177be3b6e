"""The four metric-learning benchmarks: a reader for each official layout, and each one's spec.

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

Each reader is followed by its :class:`~normsoftmax.data.registry.DatasetSpec`:
names, Recall@K cut-offs, published counts, the paper's hyperparameters and the
official files (with pinned checksums) that ``normsoftmax prepare`` fetches.
Images are decoded as the reference code does (``Image.open(path).convert("RGB")``:
no EXIF rotation, alpha dropped rather than composited).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .records import DatasetError, DatasetRecords, ImageSet, remap_shared
from .registry import DatasetSpec, SourceFile


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
            raise DatasetError(f"{path}, line {number}: expected {num_fields} fields, found {len(fields)}: "
                               f"{line.rstrip()!r}")
        rows.append((number, fields))
    if not rows:
        raise DatasetError(f"{path}: no entries")
    return rows


def _as_int(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{path}, line {number}: {text!r} is not an integer") from None


def _split_by_class_half(paths: list[str], class_ids: list[int], names: dict,
                         source: Path) -> tuple[ImageSet, ImageSet]:
    ordered = sorted(set(class_ids))
    if len(ordered) < 4:
        raise DatasetError(f"{source}: only {len(ordered)} classes found; the class-half split needs at least 4")
    train_classes = set(ordered[: len(ordered) // 2])
    train = [(p, c) for p, c in zip(paths, class_ids, strict=True) if c in train_classes]
    test = [(p, c) for p, c in zip(paths, class_ids, strict=True) if c not in train_classes]
    return (ImageSet.from_raw([p for p, _ in train], [c for _, c in train], names),
            ImageSet.from_raw([p for p, _ in test], [c for _, c in test], names))


def load_cub200(root: str | os.PathLike) -> DatasetRecords:
    base = _find_root(root, "images.txt", "CUB_200_2011")
    images = {}
    for number, (image_id, relative) in _read_table(base / "images.txt", 2):
        images[_as_int(base / "images.txt", number, image_id)] = relative
    labels = {}
    for number, (image_id, class_id) in _read_table(base / "image_class_labels.txt", 2):
        table = base / "image_class_labels.txt"
        labels[_as_int(table, number, image_id)] = _as_int(table, number, class_id)
    names = {}
    for number, (class_id, name) in _read_table(base / "classes.txt", 2):
        names[_as_int(base / "classes.txt", number, class_id)] = name
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DatasetError(f"{base / 'image_class_labels.txt'}: no class for image id {missing[0]} "
                           f"({images[missing[0]]}) listed in images.txt ({len(missing)} missing)")
    unknown = sorted(set(labels.values()) - set(names))
    if unknown:
        raise DatasetError(f"{base / 'classes.txt'}: class id {unknown[0]} used in image_class_labels.txt "
                           "is not listed")
    ids = sorted(images)
    paths = [str(base / "images" / images[i]) for i in ids]
    train, test = _split_by_class_half(paths, [labels[i] for i in ids], names, base / "image_class_labels.txt")
    return DatasetRecords("cub200", str(base), train, test=test)


CUB200 = DatasetSpec(
    name="cub200", title="CUB-200-2011", read=load_cub200, aliases=("Cub200", "cub", "cub_200_2011"),
    recall_ks=(1, 2, 4, 8), decode="reference",
    reference_counts={"train": {"images": 5864, "classes": 100}, "test": {"images": 5924, "classes": 100}},
    recipe={"lr": 0.001, "images_per_class": 25},
    homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/ (files: CaltechDATA record 65de6-vp158)",
    files=(SourceFile(
        "CUB_200_2011.tgz",
        urls=("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",),
        sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
        md5="97eceeb196236b17998738112f37df78",
        size=1150585339,
        checksum_source=("MD5: the checksum distributed with CUB_200_2011.tgz since the original Caltech release "
                         "and listed by CaltechDATA for record 65de6-vp158; SHA-256 and size: as recorded for the "
                         "same 1,150,585,339-byte archive by TensorFlow Datasets "
                         "(url_checksums/caltech_birds2011.txt)"),
    ),),
    dataset_root="CUB_200_2011",
    layout_markers=("images.txt", "CUB_200_2011/images.txt"),
)


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
            raise DatasetError(f"{mat_path}: annotation {number} has an empty or malformed relative_im_path "
                               "or class") from None
        if class_id not in class_names:
            raise DatasetError(f"{mat_path}: annotation {number} ({relative}) has class {class_id}, "
                               f"outside the {len(class_names)} class_names")
        paths.append(str(base / relative))
        class_ids.append(class_id)
    train, test = _split_by_class_half(paths, class_ids, class_names, mat_path)
    return DatasetRecords("cars196", str(base), train, test=test)


CARS196 = DatasetSpec(
    name="cars196", title="Cars196 (Stanford Cars)", read=load_cars196, aliases=("Cars196", "cars"),
    recall_ks=(1, 2, 4, 8), decode="reference",
    reference_counts={"train": {"images": 8054, "classes": 98}, "test": {"images": 8131, "classes": 98}},
    recipe={"lr": 0.01, "images_per_class": 25},
    homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (download links no longer work)",
    files=(
        SourceFile("car_ims.tgz", md5="d5c8f0aa497503f355e17dc7886c3f14",
                   checksum_source="MD5 of the original Stanford car_ims.tgz, as used by metric-learning loaders; "
                                   "no SHA-256 was ever published"),
        SourceFile("cars_annos.mat", md5="b407c6086d669747186bd1d764ff9dbc", extract=False, place="cars_annos.mat",
                   checksum_source="MD5 of the original Stanford cars_annos.mat, as used by metric-learning loaders"),
    ),
    dataset_root=".",
    instructions=(
        "Cars196 has no working official download: the Stanford links for car_ims.tgz and cars_annos.mat "
        "(ai.stanford.edu/~jkrause/cars/car_dataset.html) are dead. Get both files from a copy you trust, then run\n"
        "  normsoftmax prepare cars196 --root {root} --from-archive /path/to/car_ims.tgz "
        "--from-archive /path/to/cars_annos.mat\n"
        "(or --url URL_OF_car_ims.tgz --url URL_OF_cars_annos.mat). Files byte-identical to the original release "
        "are recognised by their MD5 and treated as official."
    ),
    layout_markers=("cars_annos.mat",),
)


def _read_ebay(path: Path, base: Path) -> tuple[list[str], list[int]]:
    rows = _read_table(path, 4, skip=1)
    header = path.read_text(encoding="utf-8").split("\n", 1)[0].split()
    if header != ["image_id", "class_id", "super_class_id", "path"]:
        raise DatasetError(f"{path}, line 1: expected the header 'image_id class_id super_class_id path', found "
                           f"{' '.join(header)!r}")
    paths = [str(base / fields[3]) for _, fields in rows]
    class_ids = [_as_int(path, number, fields[1]) for number, fields in rows]
    return paths, class_ids


def load_sop(root: str | os.PathLike) -> DatasetRecords:
    base = _find_root(root, "Ebay_train.txt", "Stanford_Online_Products")
    train = ImageSet.from_raw(*_read_ebay(base / "Ebay_train.txt", base))
    test = ImageSet.from_raw(*_read_ebay(base / "Ebay_test.txt", base))
    return DatasetRecords("sop", str(base), train, test=test)


SOP = DatasetSpec(
    name="sop", title="Stanford Online Products", read=load_sop,
    aliases=("StanfordOnlineProducts", "stanford_online_products"),
    recall_ks=(1, 10, 100, 1000), decode="reference",
    reference_counts={"train": {"images": 59551, "classes": 11318}, "test": {"images": 60502, "classes": 11316}},
    recipe={"lr": 0.01, "images_per_class": 5},
    homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
    files=(SourceFile(
        "Stanford_Online_Products.zip",
        # The project page links the FTP path; the same file is served over HTTP by ftp.cs.stanford.edu.
        urls=("http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
              "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"),
        sha256="b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
        md5="7f73d41a2f44250d4779881525aea32e",
        size=3083860082,
        checksum_source=("SHA-256 and size: as recorded for ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip "
                         "by TensorFlow Datasets (url_checksums/stanford_online_products.txt); MD5: the one used "
                         "by metric-learning loaders (e.g. pytorch-metric-learning). The project page publishes none."),
    ),),
    dataset_root="Stanford_Online_Products",
    layout_markers=("Ebay_train.txt", "Stanford_Online_Products/Ebay_train.txt"),
)


def load_inshop(root: str | os.PathLike) -> DatasetRecords:
    root = Path(root).expanduser()
    candidates = [root / "Eval" / "list_eval_partition.txt", root / "list_eval_partition.txt"]
    partition = next((c for c in candidates if c.is_file()), None)
    if partition is None:
        raise DatasetError(f"{root}: list_eval_partition.txt not found (looked for {candidates[0]} and "
                           f"{candidates[1]})")
    base = root.resolve()
    rows = _read_table(partition, 3, skip=2)  # reads (and checks the encoding of) the whole file first
    first_line, header_line = (partition.read_text(encoding="utf-8").split("\n") + ["", ""])[:2]
    first, header = first_line.strip(), header_line.split()
    if not first.isdigit():
        raise DatasetError(f"{partition}, line 1: expected the number of images, found {first!r}")
    if header != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetError(f"{partition}, line 2: expected the header 'image_name item_id evaluation_status'")
    if len(rows) != int(first):
        raise DatasetError(f"{partition}, line 1: announces {first} images but {len(rows)} are listed")
    grouped: dict[str, tuple[list[str], list[str]]] = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    for number, (image_name, item_id, status) in rows:
        if status not in grouped:
            raise DatasetError(f"{partition}, line {number}: evaluation_status {status!r} is not train, query or "
                               "gallery")
        grouped[status][0].append(str(base / image_name))
        grouped[status][1].append(item_id)
    train = ImageSet.from_raw(*grouped["train"])
    query, gallery = remap_shared([grouped["query"], grouped["gallery"]])
    return DatasetRecords("inshop", str(base), train, query=query, gallery=gallery)


INSHOP = DatasetSpec(
    name="inshop", title="In-Shop Clothes Retrieval (DeepFashion)", read=load_inshop,
    aliases=("InShop", "in-shop", "in_shop"),
    recall_ks=(1, 10, 20, 30, 40, 50), decode="reference",
    reference_counts={"train": {"images": 25882, "classes": 3997}, "query": {"images": 14218, "classes": 3985},
                      "gallery": {"images": 12612, "classes": 3985}},
    recipe={"lr": 0.01, "images_per_class": 5},
    homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
    files=(
        SourceFile("img.zip", checksum_source="none published"),
        SourceFile("list_eval_partition.txt", extract=False, place="Eval/list_eval_partition.txt",
                   checksum_source="none published"),
    ),
    dataset_root=".",
    instructions=(
        "In-Shop Clothes Retrieval cannot be downloaded automatically: the DeepFashion authors share it through a "
        "Google Drive folder linked from https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
        "(\"Download\", folder \"In-shop Clothes Retrieval Benchmark\"). From that folder download these two files:\n"
        "  Img/img.zip                    the 52,712 images (not img_highres.zip)\n"
        "  Eval/list_eval_partition.txt   the train / query / gallery split\n"
        "Put them anywhere (e.g. {root}/downloads/) and run\n"
        "  normsoftmax prepare inshop --root {root} --from-archive /path/to/img.zip "
        "--from-archive /path/to/list_eval_partition.txt\n"
        "img.zip is extracted to {root}/img/ and the list copied to {root}/Eval/list_eval_partition.txt."
    ),
    layout_markers=("Eval/list_eval_partition.txt", "list_eval_partition.txt"),
)

# The benchmarks, in the paper's order; the package registers them (normsoftmax/data/__init__.py).
SPECS = (CUB200, CARS196, SOP, INSHOP)

"""``normsoftmax prepare``: fetch, verify, extract and check a benchmark, and record what was done.

One call of :func:`prepare_dataset` takes a dataset from its official source
(or from ``--url`` / ``--from-archive``) to a folder the readers of
:mod:`normsoftmax.data.benchmarks` accept:

1. every source file is downloaded (resumable, retried; see :mod:`.download`)
   or taken from a local path, and its SHA-256 (plus MD5 and size) computed;
   it must match the pinned checksum of the official file, or the one given
   with ``--sha256``: a mismatch is an error and nothing is extracted;
2. archives are extracted safely (:mod:`.extract`), loose files (Cars196's
   ``cars_annos.mat``, In-Shop's ``list_eval_partition.txt``) copied into place;
3. the result is verified: the dataset loads, every image exists and decodes,
   and the counts are compared with the published ones (a difference is an
   error for the official files, a warning for anything else);
4. ``manifest.json`` is written in ``root``: counts, differences, checksums,
   sources, bad files, and ``dataset_root``, the path to pass as ``--dataset_root``;
5. optionally (``cache=True``) the images are pre-resized into one memory-mapped file.

A completed preparation is recognised from its manifest and the call returns
at once, without re-verifying anything, unless ``check=True``.
:func:`check_prepared` re-verifies an existing copy (with or without a manifest).

One ``root`` holds one dataset (``manifest.json`` describes it); prepare each
benchmark in its own folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import REFERENCE_COUNTS, canonical_dataset_name, compare_with_reference, load_dataset
from .download import ChecksumError, DownloadError, download, file_digests, verify_digests
from .extract import ExtractionError, extract_archive, is_archive
from .records import DatasetError

log = logging.getLogger("normsoftmax.prepare")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ARCHIVE_FOLDER = "archives"


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says what to do."""


# ---------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class SourceFile:
    """One file a dataset is made of, and what is known about the official copy of it."""

    filename: str
    urls: tuple[str, ...] = ()          # official locations, tried in order
    sha256: str | None = None           # pinned digests of the official file (None: unknown)
    md5: str | None = None
    size: int | None = None
    checksum_source: str = ""           # where the pinned digests come from
    extract: bool = True                # an archive, extracted into the root; else copied to `place`
    place: str | None = None            # destination of a loose file, relative to the root


@dataclass(frozen=True)
class DatasetSource:
    name: str
    title: str
    homepage: str
    files: tuple[SourceFile, ...]
    dataset_root: str                   # where the readers find the data, relative to the root
    instructions: str = ""              # shown when there is no automatic download


SOURCES: dict[str, DatasetSource] = {
    "cub200": DatasetSource(
        name="cub200",
        title="CUB-200-2011",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/ (files: CaltechDATA record 65de6-vp158)",
        files=(SourceFile(
            "CUB_200_2011.tgz",
            urls=("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",),
            sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
            md5="97eceeb196236b17998738112f37df78",
            size=1150585339,
            checksum_source=("MD5: the checksum distributed with CUB_200_2011.tgz since the original Caltech release "
                             "and listed by CaltechDATA for record 65de6-vp158; SHA-256 and size: as recorded for the "
                             "same 1,150,585,339-byte archive by TensorFlow Datasets (url_checksums/caltech_birds2011.txt)"),
        ),),
        dataset_root="CUB_200_2011",
    ),
    "cars196": DatasetSource(
        name="cars196",
        title="Cars196 (Stanford Cars)",
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
    ),
    "sop": DatasetSource(
        name="sop",
        title="Stanford Online Products",
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
    ),
    "inshop": DatasetSource(
        name="inshop",
        title="In-Shop Clothes Retrieval (DeepFashion)",
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
    ),
}


# ---------------------------------------------------------------------------------------------- config

@dataclass
class PrepareConfig:
    """Everything ``normsoftmax prepare`` does; the fields mirror the command-line flags."""

    dataset: str                                   # cub200 | cars196 | sop | inshop (reference-script names accepted)
    root: str                                      # --root: where archives, data and manifest.json go
    urls: list[str] = field(default_factory=list)           # --url (repeatable): replace the default sources
    from_archives: list[str] = field(default_factory=list)  # --from-archive (repeatable): local files, not downloaded
    sha256: list[str] = field(default_factory=list)         # --sha256 (repeatable): HEX, or FILENAME=HEX
    check: bool = False                            # --check: re-verify even when already prepared
    cache: bool = False                            # --cache: build the pre-resized image cache
    cache_keep_aspect: bool = False                # --cache-keep-aspect: shorter side to cache_size instead of a square
    cache_size: int = 256                          # --cache-size
    workers: int | None = None                     # --workers: processes for verification and caching (default: all cores)
    retries: int = 5                               # --retries: failed download attempts tolerated per file
    backoff: float = 1.0                           # first retry delay in seconds, doubled per failure (max 60 s)
    timeout: float = 60.0                          # --timeout: seconds without data before a connection counts as failed
    keep_archives: bool = True                     # --no-keep-archives: delete downloaded archives once verified
    progress: bool = True                          # tqdm bars (off for --quiet / tests)


# ---------------------------------------------------------------------------------------------- public API

def prepare_dataset(config: PrepareConfig) -> dict:
    """Prepare ``config.dataset`` under ``config.root`` and return its manifest (also written to manifest.json).

    Raises :class:`PrepareError` when the data cannot be obtained or does not verify; the manifest is still
    written (``"status": "failed"``) whenever verification ran, so the problems can be read there.
    """
    started = time.perf_counter()
    name = _canonical(config.dataset)
    if name not in SOURCES:
        raise PrepareError(f"prepare handles {', '.join(SOURCES)}; {config.dataset!r} (a {name} dataset) "
                           f"needs no preparation: point --dataset_root at it")
    source = SOURCES[name]
    root = Path(config.root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_NAME
    previous = _read_manifest(manifest_path)
    if previous and previous.get("dataset") != name:
        raise PrepareError(f"{root} already holds {previous.get('dataset')} (see {manifest_path}); "
                           f"prepare each dataset in its own folder, e.g. --root {root / name}")
    request = _request(config)
    explicit = bool(config.urls or config.from_archives or config.sha256)

    if previous and previous.get("status") == "complete" and (not explicit or previous.get("request") == request):
        log.info("%s is already prepared in %s (manifest %s)", source.title, root, manifest_path)
        manifest = previous
        if config.check:
            manifest = _reverify(manifest, manifest_path, config.workers, config.progress)
            if not manifest["ok"]:
                raise PrepareError(_failure_message(manifest, manifest_path, name, root))
        if config.cache:
            manifest = _ensure_cache(manifest, manifest_path, config)
        log.info("nothing to do (%.2f s)", time.perf_counter() - started)
        return manifest

    force_extract = bool(previous) and previous.get("status") != "complete"
    plan = _plan(source, config, root)
    warnings: list[str] = []
    entries = []
    for item in plan:
        entries.append(_obtain(item, root, config, warnings))
    official = all(entry["official"] for entry in entries)

    top_levels: list[str] = []
    for entry, item in zip(entries, plan):
        local = Path(entry["path"])
        if item.spec.extract:
            try:
                info = extract_archive(local, root, force=force_extract, progress=config.progress,
                                       fingerprint=entry["sha256"])
            except ExtractionError as error:
                raise PrepareError(str(error)) from error
            top_levels.extend(info.get("top_level", []))
        else:
            _place(local, root / (item.spec.place or item.spec.filename))

    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": name,
        "title": source.title,
        "homepage": source.homepage,
        "root": str(root),
        "official": official,
        "sources": entries,
        "checksums": {e["file"]: {"sha256": e["sha256"], "md5": e["md5"], "size": e["size"]} for e in entries},
        "request": request,
        "prepared_at": _now(),
    }
    dataset_root, records, load_error = _locate(name, root, source, top_levels)
    manifest["dataset_root"] = str(dataset_root)
    report = _verify(name, records, load_error, official, config.workers, config.progress)
    report["warnings"] = warnings + report["warnings"]
    manifest.update(report)
    manifest["status"] = "complete" if manifest["ok"] else "failed"
    manifest["cache"] = None
    _write_manifest(manifest_path, manifest)
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    if not manifest["ok"]:
        raise PrepareError(_failure_message(manifest, manifest_path, name, root))

    if config.cache:
        manifest = _ensure_cache(manifest, manifest_path, config, records)
    if not config.keep_archives:
        for entry in entries:
            if entry["origin"] == "download" and Path(entry["path"]).exists():
                Path(entry["path"]).unlink()
                log.info("deleted the verified archive %s", entry["path"])
                entry["deleted"] = True
        _write_manifest(manifest_path, manifest)
    log.info("%s prepared in %.1f s: pass --dataset_root %s", source.title, time.perf_counter() - started, dataset_root)
    return manifest


def check_prepared(root: str | os.PathLike, dataset: str | None = None, workers: int | None = None,
                   progress: bool = True) -> dict:
    """Re-verify a prepared dataset: it loads, every image decodes, counts vs the reference.

    ``root`` is the folder given to prepare (holding manifest.json) or the dataset folder itself. Without a
    manifest, ``dataset`` (or the layout found in ``root``) says what to check, and nothing is written.
    Returns the manifest / report with ``ok``, ``bad_files``, ``errors``, ``warnings``; raises
    :class:`PrepareError` only when there is nothing recognisable to check.
    """
    root = Path(root).expanduser().resolve()
    for candidate in (root / MANIFEST_NAME, root.parent / MANIFEST_NAME):
        manifest = _read_manifest(candidate)
        if manifest and (candidate.parent == root or Path(manifest.get("dataset_root", "")) == root):
            if dataset is not None and _canonical(dataset) != manifest.get("dataset"):
                raise PrepareError(f"{candidate} describes {manifest.get('dataset')}, not {dataset}")
            return _reverify(manifest, candidate, workers, progress)
    name = _canonical(dataset) if dataset is not None else _detect(root)
    if name not in SOURCES:
        raise PrepareError(f"{name} datasets have no reference to check against; load them with --dataset_root")
    dataset_root, records, load_error = _locate(name, root, SOURCES[name], [])
    report = {"format": MANIFEST_FORMAT, "dataset": name, "root": str(root), "dataset_root": str(dataset_root),
              "official": False, "status": None}
    report.update(_verify(name, records, load_error, False, workers, progress))
    report["checked_at"] = report.pop("verified_at")
    return report


def manual_instructions(dataset: str, root: str | os.PathLike = "DIR") -> str:
    """What a user must fetch by hand for ``dataset`` (empty when it downloads by itself)."""
    return SOURCES[_canonical(dataset)].instructions.format(root=root)


def _canonical(dataset: str) -> str:
    try:
        return canonical_dataset_name(dataset)
    except DatasetError as error:
        raise PrepareError(str(error)) from None


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class _Planned:
    spec: SourceFile
    origin: str                  # "download" or "archive"
    locations: tuple[str, ...]   # URLs tried in order, or the one local path
    user_sha256: str | None
    custom: bool                 # not the dataset's default location


def _request(config: PrepareConfig) -> dict:
    return {"urls": list(config.urls), "from_archives": [str(Path(p).expanduser().resolve()) for p in config.from_archives],
            "sha256": [s.lower() for s in config.sha256]}


def _plan(source: DatasetSource, config: PrepareConfig, root: Path) -> list[_Planned]:
    items = [("download", url) for url in config.urls] + [("archive", str(Path(p).expanduser())) for p in config.from_archives]
    if not items:
        if not all(spec.urls for spec in source.files):
            raise PrepareError(source.instructions.format(root=root))
        items_by_file = {spec.filename: None for spec in source.files}
    else:
        items_by_file = _assign(source, items)
    hashes = _parse_sha256(config.sha256, source, items, items_by_file)
    plan = []
    for spec in source.files:
        item = items_by_file[spec.filename]
        if item is None:
            plan.append(_Planned(spec, "download", spec.urls, hashes.get(spec.filename), custom=False))
        else:
            origin, location = item
            plan.append(_Planned(spec, origin, (location,), hashes.get(spec.filename), custom=True))
    return plan


def _basename(origin: str, location: str) -> str:
    if origin == "download":
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path)).name
    return Path(location).name


def _assign(source: DatasetSource, items: list[tuple[str, str]]) -> dict:
    """Match each --url / --from-archive to one of the dataset's files: by name, else by role (archive or not)."""
    assigned: dict[str, tuple[str, str] | None] = {spec.filename: None for spec in source.files}
    pending = []
    for item in items:
        base = _basename(*item).lower()
        match = next((s.filename for s in source.files if s.filename.lower() == base), None)
        if match is None:
            pending.append(item)
        elif assigned[match] is not None:
            raise PrepareError(f"two sources given for {match}: {assigned[match][1]} and {item[1]}")
        else:
            assigned[match] = item
    for item in pending:
        free = [s for s in source.files if assigned[s.filename] is None]
        if len(source.files) > 1:
            role = is_archive(_basename(*item))
            free = [s for s in free if s.extract == role]
        if len(free) != 1:
            expected = ", ".join(s.filename for s in source.files)
            raise PrepareError(f"cannot tell which {source.title} file {item[1]} is; {source.title} needs {expected} "
                               f"(name the file accordingly)")
        assigned[free[0].filename] = item
    missing = [name for name, item in assigned.items() if item is None]
    if missing:
        given = ", ".join(location for _, location in items)
        raise PrepareError(f"{source.title} needs {', '.join(s.filename for s in source.files)}; "
                           f"given {given}, missing {', '.join(missing)}.\n" + source.instructions.format(root="DIR"))
    return assigned


def _parse_sha256(values: list[str], source: DatasetSource, items, items_by_file) -> dict[str, str]:
    hashes: dict[str, str] = {}
    positional = []
    for value in values:
        name, sep, digest = value.rpartition("=")
        digest = digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise PrepareError(f"--sha256 {value!r}: expected 64 hexadecimal digits (optionally FILENAME=HEX)")
        if sep:
            match = next((s.filename for s in source.files if s.filename.lower() == Path(name).name.lower()), None)
            if match is None:
                raise PrepareError(f"--sha256 {value!r}: {source.title} has no file {name!r} "
                                   f"(its files: {', '.join(s.filename for s in source.files)})")
            hashes[match] = digest
        else:
            positional.append(digest)
    if positional:
        # In the order of --url then --from-archive, or of the dataset's files when neither is given.
        order = ([next(f for f, it in items_by_file.items() if it == item) for item in items] if items
                 else [s.filename for s in source.files])
        if len(positional) > len(order):
            raise PrepareError(f"{len(positional)} --sha256 values for {len(order)} file(s) ({', '.join(order)})")
        for filename, digest in zip(order, positional):
            hashes.setdefault(filename, digest)
    return hashes


# ---------------------------------------------------------------------------------------------- obtaining

def _obtain(item: _Planned, root: Path, config: PrepareConfig, warnings: list[str]) -> dict:
    spec = item.spec
    pinned = {"sha256": spec.sha256, "md5": spec.md5, "size": spec.size}
    has_pinned = any(v is not None for v in pinned.values())
    if item.user_sha256:
        expected = {"sha256": item.user_sha256, "md5": None, "size": None}
        checksum = "given with --sha256"
    elif not item.custom and has_pinned:
        expected = pinned
        checksum = "pinned (official)"
    else:
        expected = {"sha256": None, "md5": None, "size": None}
        checksum = None  # decided below, after hashing

    if item.origin == "download":
        destination = root / ARCHIVE_FOLDER / spec.filename
        result, errors = None, []
        for url in item.locations:
            try:
                result = download(url, destination, retries=config.retries, backoff=config.backoff,
                                  timeout=config.timeout, progress=config.progress, **expected)
                break
            except ChecksumError as error:  # never try another mirror with a file that does not verify
                raise PrepareError(str(error)) from error
            except DownloadError as error:
                errors.append(str(error))
                log.warning("%s", error)
        if result is None:
            raise PrepareError(f"could not download {spec.filename}:\n  " + "\n  ".join(errors))
        digests = {"sha256": result.sha256, "md5": result.md5, "size": result.size}
        path, location = destination, result.url
    else:
        path = Path(item.locations[0]).expanduser().resolve()
        if not path.is_file():
            raise PrepareError(f"--from-archive {item.locations[0]}: no such file"
                               + (" (a folder: point --dataset_root at it, or run `normsoftmax prepare --check` on it)"
                                  if path.is_dir() else ""))
        digests = file_digests(path, progress=config.progress, desc=f"hashing {path.name}")
        problems = verify_digests(digests, **expected)
        if problems:
            raise PrepareError(f"{path} does not match {checksum}: {'; '.join(problems)}. Nothing was extracted; "
                               f"the file was left where it is.")
        location = str(path)

    matches_official = has_pinned and not verify_digests(digests, **pinned)
    if checksum is None:
        if matches_official:
            checksum = "matches the official file"
        else:
            checksum = "recorded at first use"
            differs = (f"; it is not the official file ({verify_digests(digests, sha256=spec.sha256, md5=spec.md5)[0]})"
                       if has_pinned else "")
            if item.custom:
                warnings.append(f"{spec.filename} from {location} is unverified: no --sha256 was given; its SHA-256 "
                                f"{digests['sha256']} is recorded in the manifest{differs}")
            else:
                warnings.append(f"{spec.filename}: no official checksum is published; its SHA-256 "
                                f"{digests['sha256']} is recorded in the manifest")
    return {"file": spec.filename, "origin": item.origin, "location": location, "path": str(path),
            "sha256": digests["sha256"], "md5": digests["md5"], "size": digests["size"],
            "checksum": checksum, "checksum_source": spec.checksum_source if matches_official else "",
            "official": bool(matches_official)}


def _place(source: Path, destination: Path) -> None:
    """Copy a loose file into the dataset layout (atomically; the original stays where it was)."""
    if source.resolve() == destination.resolve():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(destination.name + ".tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, destination)


# ---------------------------------------------------------------------------------------------- verification

def _locate(name: str, root: Path, source: DatasetSource, top_levels: list[str]):
    """(dataset_root, records or None, error or None): the expected folder first, then the extracted ones."""
    candidates = [(root / source.dataset_root).resolve(), root] + [root / top for top in top_levels]
    first_error = None
    for candidate in dict.fromkeys(candidates):
        if not candidate.is_dir():
            continue
        try:
            records = load_dataset(name, candidate)
        except DatasetError as error:
            first_error = first_error or error
            continue
        return Path(records.root), records, None
    return (root / source.dataset_root).resolve(), None, first_error or DatasetError(f"{root}: no {name} data found")


def _verify(name: str, records, load_error, official: bool, workers: int | None, progress: bool) -> dict:
    from .images import find_bad_images

    errors, warnings = [], []
    report = {"counts": {}, "reference_counts": REFERENCE_COUNTS.get(name), "reference_differences": [],
              "bad_files": [], "verified_at": _now()}
    if records is None:
        errors.append(f"the dataset does not load: {load_error}")
    else:
        report["counts"] = records.counts()
        paths = records.all_paths()
        bad = find_bad_images(paths, workers=workers, progress=progress)
        report["bad_files"] = [[path, reason] for path, reason in bad]
        report["images_checked"] = len(paths)
        if bad:
            listed = "; ".join(f"{p}: {r}" for p, r in bad[:5]) + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
            errors.append(f"{len(bad)} of {len(paths)} images are missing or do not decode: {listed}")
        differences = compare_with_reference(name, records)
        report["reference_differences"] = differences
        if differences:
            text = "counts differ from the published ones: " + "; ".join(differences)
            (errors if official else warnings).append(text)
    report.update(ok=not errors, errors=errors, warnings=warnings)
    return report


def _reverify(manifest: dict, manifest_path: Path, workers: int | None, progress: bool) -> dict:
    name = manifest["dataset"]
    dataset_root = Path(manifest["dataset_root"])
    try:
        records, load_error = load_dataset(name, dataset_root), None
    except DatasetError as error:
        records, load_error = None, error
    report = _verify(name, records, load_error, bool(manifest.get("official")), workers, progress)
    report["checked_at"] = report.pop("verified_at")
    cache_info = manifest.get("cache")
    if cache_info and records is not None:
        from .cache import find_cache
        from .images import ImageTransformConfig

        config = ImageTransformConfig(resize=cache_info["resize"], keep_aspect=cache_info["keep_aspect"])
        if find_cache(records, config, cache_info["path"]) is None:
            report["warnings"].append(f"the image cache {cache_info['path']} is stale or incomplete; "
                                      f"run prepare with --cache to rebuild it")
    manifest = dict(manifest)
    manifest.update(report)
    manifest["status"] = "complete" if manifest["ok"] else "failed"
    _write_manifest(manifest_path, manifest)
    for warning in report["warnings"]:
        log.warning("%s", warning)
    for error in report["errors"]:
        log.error("%s", error)
    return manifest


def _ensure_cache(manifest: dict, manifest_path: Path, config: PrepareConfig, records=None) -> dict:
    from .cache import build_cache, find_cache
    from .images import ImageTransformConfig

    transform = ImageTransformConfig(resize=config.cache_size, keep_aspect=config.cache_keep_aspect)
    if records is None:
        records = load_dataset(manifest["dataset"], manifest["dataset_root"])
    current = manifest.get("cache")
    if current and current.get("resize") == transform.resize and current.get("keep_aspect") == transform.keep_aspect:
        if find_cache(records, transform, current["path"]) is not None:
            return manifest
    directory = build_cache(records, transform, workers=config.workers, progress=config.progress)
    manifest = dict(manifest)
    manifest["cache"] = {"path": str(directory), "resize": transform.resize, "keep_aspect": transform.keep_aspect,
                         "images": len(set(records.all_paths())), "built_at": _now()}
    _write_manifest(manifest_path, manifest)
    return manifest


def _failure_message(manifest: dict, manifest_path: Path, name: str, root: Path) -> str:
    lines = [f"{manifest.get('title', name)} in {root} did not verify:"]
    lines += [f"  - {error}" for error in manifest["errors"]]
    lines.append(f"Details in {manifest_path}. Running `normsoftmax prepare {name} --root {root}` again "
                 f"re-extracts the archives.")
    return "\n".join(lines)


def _detect(root: Path) -> str:
    layouts = [("cub200", ["images.txt", "CUB_200_2011/images.txt"]), ("cars196", ["cars_annos.mat"]),
               ("sop", ["Ebay_train.txt", "Stanford_Online_Products/Ebay_train.txt"]),
               ("inshop", ["Eval/list_eval_partition.txt", "list_eval_partition.txt"])]
    for name, markers in layouts:
        if any((root / marker).is_file() for marker in markers):
            return name
    raise PrepareError(f"{root}: no manifest.json and no known dataset layout; name the dataset "
                       f"(normsoftmax prepare DATASET --root {root} --check)")


# ---------------------------------------------------------------------------------------------- manifest io

def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring the unreadable manifest %s (%s)", path, error)
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifest(path: Path, manifest: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(staging, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["PrepareConfig", "PrepareError", "prepare_dataset", "check_prepared", "manual_instructions",
           "SOURCES", "SourceFile", "DatasetSource"]

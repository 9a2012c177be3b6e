"""``normsoftmax prepare``: fetch, verify, extract and check a benchmark, and record what was done.

One call of :func:`prepare_dataset` takes a dataset from its official source
(its spec's ``files``, see :mod:`normsoftmax.data.benchmarks`; or ``--url`` /
``--from-archive``) to a folder the dataset's reader accepts:

1. every source file is downloaded (resumable, retried; see :mod:`.download`)
   or taken from a local path, and its SHA-256 (plus MD5 and size) computed;
   it must match the pinned checksum of the official file, or the one given
   with ``--sha256``: a mismatch is an error and nothing is extracted; a file
   that fails after a resumed download is fetched once more from scratch;
2. archives are extracted safely (:mod:`.extract`), loose files (Cars196's
   ``cars_annos.mat``, In-Shop's ``list_eval_partition.txt``) copied into place;
3. the result is verified: the dataset loads, every image exists and decodes,
   and the counts are compared with the published ones (a difference is an
   error for the official files, a warning for anything else);
4. ``manifest.json`` is written in ``root``: counts, differences, checksums,
   sources, bad files, and ``dataset_root``, the path to pass as ``--dataset_root``;
5. optionally (``cache=True``) the images are pre-resized into one memory-mapped file
   (:mod:`.cache`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PrepareConfig
from ..data.records import DatasetError
from ..data.registry import (
    DatasetSpec,
    SourceFile,
    compare_with_reference,
    dataset_spec,
    load_dataset,
    registered_datasets,
)
from ..files import atomic_output, atomic_write
from .download import (
    ChecksumError,
    DownloadError,
    download,
    file_digests,
    verify_digests,
)
from .extract import ExtractionError, extract_archive, is_archive

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ARCHIVE_FOLDER = "archives"


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says what to do."""


# ---------------------------------------------------------------------------------------------- public API

def prepare_dataset(config: PrepareConfig) -> dict:
    """Prepare ``config.dataset`` under ``config.root`` and return its manifest (also written to manifest.json).

    ``config.check`` set to a folder (``--check DIR``) re-verifies that folder instead (:func:`check_prepared`);
    ``check=True`` re-verifies an already prepared root. Raises :class:`PrepareError` when the data cannot be
    obtained or does not verify; the manifest is still written (``"status": "failed"``) whenever verification
    ran, so the problems can be read there.
    """
    if isinstance(config.check, str) and config.check:
        return check_prepared(config.check, dataset=config.dataset, workers=config.workers, progress=config.progress)
    if config.dataset is None:
        raise ValueError("name a dataset (" + ", ".join(s.name for s in _preparable()) + "), or use --check DIR")
    started = time.perf_counter()
    source = _spec(config.dataset)
    if not source.preparable:
        raise PrepareError(f"prepare handles {', '.join(s.name for s in _preparable())}; {config.dataset!r} "
                           f"(a {source.name} dataset) needs no preparation: point --dataset_root at it")
    root = Path(config.root or source.default_root or f"data/{source.name}").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_NAME
    previous = _read_manifest(manifest_path)
    if previous and previous.get("dataset") != source.name:
        raise PrepareError(f"{root} already holds {previous.get('dataset')} (see {manifest_path}); "
                           f"prepare each dataset in its own folder, e.g. --root {root / source.name}")
    explicit = bool(config.urls or config.from_archives or config.sha256)
    same_request = not explicit or (previous or {}).get("request") == _request(config)
    if previous and previous.get("status") == "complete" and same_request:
        manifest = _already_prepared(previous, manifest_path, source, config)
    else:
        manifest, records = _fetch_and_verify(source, root, config, force_extract=bool(previous))
        if config.cache:
            manifest = _ensure_cache(manifest, manifest_path, config, records)
        if not config.keep_archives:
            _delete_downloaded_archives(manifest, manifest_path)
    log.info("%s ready in %.1f s: pass --dataset_root %s", source.title, time.perf_counter() - started,
             manifest["dataset_root"])
    return manifest


def _already_prepared(manifest: dict, manifest_path: Path, source: DatasetSpec, config: PrepareConfig) -> dict:
    log.info("%s is already prepared in %s (manifest %s)", source.title, manifest_path.parent, manifest_path)
    if config.check:
        manifest = _reverify(manifest, manifest_path, config.workers, config.progress)
        if not manifest["ok"]:
            raise PrepareError(_failure_message(manifest, manifest_path, source.name, manifest_path.parent))
    if config.cache:
        manifest = _ensure_cache(manifest, manifest_path, config)
    return manifest


def _fetch_and_verify(source: DatasetSpec, root: Path, config: PrepareConfig, force_extract: bool):
    """Obtain every file, extract or place it, verify the result; (manifest, records). Raises on failure."""
    plan = _plan(source, config, root)
    warnings: list[str] = []
    entries = [_obtain(item, root, config, warnings) for item in plan]
    top_levels: list[str] = []
    for entry, item in zip(entries, plan, strict=True):
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
    official = all(entry["official"] for entry in entries)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "dataset": source.name, "title": source.title, "homepage": source.homepage,
        "root": str(root), "official": official, "sources": entries,
        "checksums": {e["file"]: {"sha256": e["sha256"], "md5": e["md5"], "size": e["size"]} for e in entries},
        "request": _request(config), "prepared_at": _now(),
    }
    dataset_root, records, load_error = _locate(source, root, top_levels)
    manifest["dataset_root"] = str(dataset_root)
    report = _verify(source.name, records, load_error, official, config.workers, config.progress)
    report["warnings"] = warnings + report["warnings"]
    manifest.update(report)
    manifest["status"] = "complete" if manifest["ok"] else "failed"
    manifest["cache"] = None
    manifest_path = root / MANIFEST_NAME
    _write_manifest(manifest_path, manifest)
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    if not manifest["ok"]:
        raise PrepareError(_failure_message(manifest, manifest_path, source.name, root))
    return manifest, records


def _delete_downloaded_archives(manifest: dict, manifest_path: Path) -> None:
    for entry in manifest["sources"]:
        if entry["origin"] == "download" and Path(entry["path"]).exists():
            Path(entry["path"]).unlink()
            log.info("deleted the verified archive %s", entry["path"])
            entry["deleted"] = True
    _write_manifest(manifest_path, manifest)


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
            if dataset is not None and _spec(dataset).name != manifest.get("dataset"):
                raise PrepareError(f"{candidate} describes {manifest.get('dataset')}, not {dataset}")
            return _reverify(manifest, candidate, workers, progress)
    source = _spec(dataset) if dataset is not None else _detect(root)
    if not source.reference_counts:
        raise PrepareError(f"{source.name} datasets have no reference to check against; load them with --dataset_root")
    dataset_root, records, load_error = _locate(source, root, [])
    report = {"format": MANIFEST_FORMAT, "dataset": source.name, "root": str(root), "dataset_root": str(dataset_root),
              "official": False, "status": None}
    report.update(_verify(source.name, records, load_error, False, workers, progress))
    report["checked_at"] = report.pop("verified_at")
    return report


def manual_instructions(dataset: str, root: str | os.PathLike = "DIR") -> str:
    """What a user must fetch by hand for ``dataset`` (empty when it downloads by itself)."""
    return _spec(dataset).instructions.format(root=root)


def _spec(dataset: str) -> DatasetSpec:
    try:
        return dataset_spec(dataset)
    except DatasetError as error:
        raise PrepareError(str(error)) from None


def _preparable() -> list[DatasetSpec]:
    return [spec for spec in registered_datasets() if spec.preparable]


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class _Planned:
    spec: SourceFile
    origin: str                  # "download" or "archive"
    locations: tuple[str, ...]   # URLs tried in order, or the one local path
    user_sha256: str | None
    custom: bool                 # not the dataset's default location


def _request(config: PrepareConfig) -> dict:
    return {"urls": list(config.urls),
            "from_archives": [str(Path(p).expanduser().resolve()) for p in config.from_archives],
            "sha256": [s.lower() for s in config.sha256]}


def _plan(source: DatasetSpec, config: PrepareConfig, root: Path) -> list[_Planned]:
    items = [("download", url) for url in config.urls]
    items += [("archive", str(Path(p).expanduser())) for p in config.from_archives]
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


def _assign(source: DatasetSpec, items: list[tuple[str, str]]) -> dict:
    """Match each --url / --from-archive to one of the dataset's files: by name, else by role (archive or not)."""
    assigned: dict[str, tuple[str, str] | None] = {spec.filename: None for spec in source.files}
    pending = []
    for item in items:
        base = _basename(*item).lower()
        match = next((s.filename for s in source.files if s.filename.lower() == base), None)
        if match is None:
            pending.append(item)
        elif (earlier := assigned[match]) is not None:
            raise PrepareError(f"two sources given for {match}: {earlier[1]} and {item[1]}")
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


def _parse_sha256(values: list[str], source: DatasetSpec, items, items_by_file) -> dict[str, str]:
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
        for filename, digest in zip(order, positional, strict=True):
            hashes.setdefault(filename, digest)
    return hashes


# ---------------------------------------------------------------------------------------------- obtaining

def _obtain(item: _Planned, root: Path, config: PrepareConfig, warnings: list[str]) -> dict:
    spec = item.spec
    pinned: dict[str, Any] = {"sha256": spec.sha256, "md5": spec.md5, "size": spec.size}
    has_pinned = any(v is not None for v in pinned.values())
    expected: dict[str, Any]
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
        digests: dict[str, Any] = {"sha256": result.sha256, "md5": result.md5, "size": result.size}
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
    with atomic_output(destination) as staging:
        shutil.copyfile(source, staging)


# ---------------------------------------------------------------------------------------------- verification

def _locate(source: DatasetSpec, root: Path, top_levels: list[str]):
    """(dataset_root, records or None, error or None): the expected folder first, then the extracted ones."""
    name = source.name
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
    from ..data.images import find_bad_images

    errors: list[str] = []
    warnings: list[str] = []
    report: dict[str, Any] = {"counts": {}, "reference_counts": dataset_spec(name).reference_counts,
                              "reference_differences": [], "bad_files": [], "verified_at": _now()}
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
    except DatasetError as failure:
        records, load_error = None, failure
    report = _verify(name, records, load_error, bool(manifest.get("official")), workers, progress)
    report["checked_at"] = report.pop("verified_at")
    cache_info = manifest.get("cache")
    if cache_info and records is not None:
        from ..data.cache import find_cache
        from ..data.images import ImageTransformConfig

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
    from ..data.cache import find_cache
    from ..data.images import ImageTransformConfig
    from .cache import build_cache

    transform = ImageTransformConfig(resize=config.cache_size, keep_aspect=config.cache_keep_aspect)
    if records is None:
        records = load_dataset(manifest["dataset"], manifest["dataset_root"])
    current = manifest.get("cache") or {}
    same_geometry = bool(current) and current.get("resize") == transform.resize \
        and current.get("keep_aspect") == transform.keep_aspect
    if same_geometry and find_cache(records, transform, current["path"]) is not None:
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


def _detect(root: Path) -> DatasetSpec:
    for spec in registered_datasets():
        if any((root / marker).is_file() for marker in spec.layout_markers):
            return spec
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
    atomic_write(path, json.dumps(manifest, indent=2, default=str) + "\n", durable=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["PrepareError", "prepare_dataset", "check_prepared", "manual_instructions"]

"""A collection of embeddings in a folder: faiss indexes, what their ids mean, and the changes since.

An index folder holds::

    index.json                  what the folder holds (model, dim, kinds, IVF parameters, calibration, sources,
                                the next id, the names of the files below); replaced last: the commit point
    float.<generation>.faiss    exact cosine (faiss ``IndexIDMap2`` over ``IndexFlatIP``; vectors are
                                L2-normalised) or IVF-PQ (approximate, for millions of vectors); absent for
                                ``binary`` indexes
    binary.<generation>.faiss   ``IndexBinaryIDMap2`` over the sign bits (bit = x > 0): exact Hamming
    items.<generation>.npz      id -> path, label, metadata (:class:`~normsoftmax.search.items.Items`)
    vectors.<generation>.npy    IVF-PQ only: the exact vectors (PQ codes are approximate; duplicates and item
                                queries re-score with these)
    journal.<generation>.log    the items added and removed since the generation, one fsynced line per change
                                (:mod:`~normsoftmax.search.journal`)
    images/                     images uploaded through the service, by id

Ids count up from 0 and are never reused, removed or not. A change is either a journal line (adding or removing
items while the collection is served: one fsync, durable before it is acknowledged) or a new generation (building,
adding an embeddings file, compaction when the journal grows): every file of the generation written and synced,
then ``index.json`` replaced, then the previous generation's files deleted. A crash at any moment leaves
``index.json`` naming one complete generation, and its journal up to the last whole line. Changes hold an
exclusive lock on the folder, so a service and ``normsoftmax index add`` / ``remove`` never interleave; each
picks up the other's changes (:meth:`SearchIndex.refresh`) before it changes anything, and a service before it
answers.

Searches see the collection before or after a change, never in between: an open index applies a change to its
faiss indexes and item table under one lock that searches take too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..embedding.files import EmbeddingsFile
from ..files import atomic_output, atomic_write, ensure_free_space
from . import journal
from .items import ItemRecord, Items
from .journal import Change
from .vectors import (
    MIN_IVF_VECTORS,
    PQ_BITS,
    SCORE_NAMES,
    SEARCH_KINDS,
    IvfParameters,
    Neighbours,
    binary_codes,
    check_k,
    check_kind,
    choose_ivf_parameters,
    normalized,
)

INDEX_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: before ids could be removed (plain faiss indexes, ids 0..count-1)
METADATA_NAME = "index.json"
LOCK_NAME = ".lock"
IMAGES_FOLDER = "images"
# index kind -> the searchable representations it stores
KINDS = {"flat": ("float", "binary"), "ivf": ("float", "binary"), "binary": ("binary",)}
# The journal is folded into a new generation beyond this many changes or bytes.
COMPACT_CHANGES = 4096
COMPACT_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------ the folder
@contextlib.contextmanager
def folder_lock(directory: Path):
    """An exclusive lock on an index folder for the duration of a change (no-op where fcntl is missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_our_file(name: str) -> bool:
    """Files an index folder may hold besides index.json: generations, journals, the lock, temporaries."""
    return (name in (LOCK_NAME, IMAGES_FOLDER) or (name.startswith(".") and name.endswith(".tmp"))
            or any(name.startswith(prefix) and name.endswith(suffix)
                   for prefix, suffix in (("float.", ".faiss"), ("binary.", ".faiss"), ("items.", ".npz"),
                                          ("vectors.", ".npy"), ("journal.", ".log"))))


def read_metadata(directory: Path) -> dict:
    file = directory / METADATA_NAME
    if not file.is_file():
        hint = "" if directory.is_dir() else " (the folder does not exist)"
        raise FileNotFoundError(f"{directory} is not an index folder: no {METADATA_NAME}{hint}; "
                                f"build one with `normsoftmax index build EMBEDDINGS.npz --out {directory}`")
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error}); the index folder is damaged") from None
    if not isinstance(metadata, dict) or metadata.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{file}: not a normsoftmax index description (format {INDEX_FORMAT})")
    missing = [key for key in ("kind", "dim", "count", "generation", "files", "sources") if key not in metadata]
    roles = ("items",) + KINDS.get(str(metadata.get("kind")), ())
    if missing or metadata["kind"] not in KINDS or not all(role in metadata["files"] for role in roles):
        raise ValueError(f"{file}: incomplete index description (missing {', '.join(missing) or 'files'}); "
                         f"the index folder is damaged")
    return metadata


def _check_file(directory: Path, metadata: dict, role: str) -> Path:
    entry = metadata["files"][role]
    file = directory / entry["name"]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing, but {directory / METADATA_NAME} lists it; "
                                f"the index folder is damaged")
    if file.stat().st_size != entry["bytes"]:
        raise ValueError(f"{file}: {file.stat().st_size} bytes where {entry['bytes']} were written; "
                         f"the file is damaged")
    return file


def _read_faiss(directory: Path, metadata: dict, role: str):
    file = _check_file(directory, metadata, role)
    reader = faiss.read_index_binary if role == "binary" else faiss.read_index
    try:
        index = reader(str(file))
    except RuntimeError as error:
        raise ValueError(f"{file}: cannot be read as a faiss index ({str(error).splitlines()[0][:200]})") from None
    expected_dim = metadata["dim"] if role == "float" else 8 * math.ceil(metadata["dim"] / 8)
    if index.ntotal != metadata["count"] or index.d != expected_dim:
        raise ValueError(f"{file}: holds {index.ntotal} vectors of {index.d} dims where {METADATA_NAME} says "
                         f"{metadata['count']} of {expected_dim}; the index folder is damaged")
    if metadata["format"] == 1:  # ids were the positions: give them an id map, as format 2 keeps
        index = _with_id_map(index, role, metadata["dim"])
    return index


def _with_id_map(index, role: str, dim: int):
    if role == "binary":
        mapped = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(index.d))
        codes = np.stack([index.reconstruct(i) for i in range(index.ntotal)]) if index.ntotal else \
            np.zeros((0, index.code_size), np.uint8)
        mapped.add_with_ids(codes, np.arange(index.ntotal, dtype=np.int64))
        return mapped
    if faiss.try_extract_index_ivf(index) is not None:
        return index  # IVF lists already keep ids (sequential in format 1)
    mapped = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    mapped.add_with_ids(index.reconstruct_n(0, index.ntotal), np.arange(index.ntotal, dtype=np.int64))
    return mapped


def _empty_float_index(kind: str, dim: int, ivf: IvfParameters | None, sample: np.ndarray | None, seed: int):
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "ivf":
        assert ivf is not None and sample is not None
        return _trained_ivf(sample, ivf, seed)
    return None


def _empty_binary_index(dim: int):
    return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(8 * math.ceil(dim / 8)))


# ------------------------------------------------------------------------------------------ the index
class SearchIndex:
    """An index folder, open: search by vectors or by stored items, add and remove items, map ids to records.

    Thread-safe: searches and changes of one object hold one lock while they touch its state; changes also lock
    the folder against other processes.
    """

    def __init__(self, directory: Path, metadata: dict, float_index, binary_index, items: Items,
                 vectors: np.ndarray | None = None):
        self.directory = directory
        self.metadata = metadata
        self.float_index = float_index
        self.binary_index = binary_index
        self.items = items  # the generation's table
        self.vectors = vectors  # IVF only: the generation's exact vectors, rows as ``items``
        self.added: dict[int, ItemRecord] = {}  # from the journal
        self.removed: set[int] = set()  # generation ids removed by the journal
        self.journal_end = 0  # bytes of the journal applied
        # ids handed out so far (removed ones included: an id is never given twice)
        self._next_id = int(metadata.get("next_id", metadata["count"]))
        self._stamp: tuple = ()
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------------- description
    @property
    def location(self) -> str:
        return str(self.directory)

    @property
    def count(self) -> int:
        return len(self.items) - len(self.removed) + len(self.added)

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The representations that can be searched: ``float`` and/or ``binary``."""
        return KINDS[self.kind]

    @property
    def model(self) -> dict | None:
        """The model that made the vectors (checkpoint, digest, model_name, dim, resize, crop), when known."""
        return self.metadata.get("model")

    @property
    def digest(self) -> str | None:
        return (self.model or {}).get("digest")

    @property
    def calibration(self) -> dict | None:
        """The match thresholds the index carries (see :mod:`normsoftmax.calibration`), or None."""
        return self.metadata.get("calibration")

    @property
    def ivf(self) -> IvfParameters | None:
        return IvfParameters(**self.metadata["ivf"]) if self.metadata.get("ivf") else None

    @property
    def next_id(self) -> int:
        return self._next_id

    def describe(self) -> dict:
        """path, count, kinds (and nlist, nprobe for IVF): what ``normsoftmax index build/add`` print."""
        info = {"path": str(self.directory), "count": self.count, "kinds": list(self.kinds), "kind": self.kind,
                "dim": self.dim, "next_id": self.next_id}
        if self.ivf:
            info.update(nlist=self.ivf.nlist, nprobe=self.ivf.nprobe, pq_m=self.ivf.pq_m)
        return info

    def ids(self) -> np.ndarray:
        """Every id in the collection, ascending."""
        with self._lock:
            base = self.items.ids[~np.isin(self.items.ids, list(self.removed))] if self.removed else self.items.ids
            return np.concatenate([base, np.array(sorted(self.added), dtype=np.int64)])

    def record(self, item_id: int) -> ItemRecord:
        """The item ``item_id`` (without its vector); KeyError when the collection has no such id."""
        item_id = int(item_id)
        with self._lock:
            if item_id in self.added:
                return self.added[item_id]
            row = self.items.row(item_id)
            if row is None or item_id in self.removed:
                raise KeyError(self._no_item(item_id))
            return self.items.record(row)

    def _no_item(self, item_id: int) -> str:
        if 0 <= item_id < self.next_id:
            return f"no item {item_id}: it was removed"
        return f"no item {item_id}: the index holds ids 0 to {self.next_id - 1}"

    def path_of(self, item_id: int) -> str:
        """The image path of ``item_id``; KeyError when the index has no such id."""
        return self.record(item_id).path

    def item(self, item_id: int) -> dict:
        """id, path and (when known) label and metadata of ``item_id``."""
        return self.record(item_id).describe()

    def check_model(self, model) -> None:
        """Refuse a model other than the one that embedded this index: its vectors would not be comparable."""
        check_model(self.model, model, self.location)

    # -------------------------------------------------------------------------------------- opening, creating
    @classmethod
    def open(cls, directory: str | os.PathLike) -> SearchIndex:
        """Open an index folder and apply its journal; FileNotFoundError / ValueError name what is missing or
        damaged."""
        directory = Path(directory).expanduser().resolve()
        for attempt in range(5):
            try:
                return cls._load(directory)
            except FileNotFoundError:
                # a compaction by another process may have replaced the generation between reading index.json
                # and its files: read index.json again
                if attempt == 4 or not (directory / METADATA_NAME).is_file():
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, directory: Path) -> SearchIndex:
        metadata = read_metadata(directory)
        float_index = _read_faiss(directory, metadata, "float") if "float" in KINDS[metadata["kind"]] else None
        binary_index = _read_faiss(directory, metadata, "binary")
        items = Items.read(_check_file(directory, metadata, "items"), metadata["count"])
        vectors = None
        if "vectors" in metadata["files"]:
            vectors = np.load(_check_file(directory, metadata, "vectors"), mmap_mode="r")
        index = cls(directory, metadata, float_index, binary_index, items, vectors)
        index._replay()
        return index

    @classmethod
    def create(cls, directory: str | os.PathLike, embeddings: EmbeddingsFile, kind: str = "flat", *,
               ivf: IvfParameters | None = None, seed: int = 0, source: dict | None = None,
               calibration: dict | None = None) -> SearchIndex:
        """Build an index of ``kind`` (flat, binary, ivf) from ``embeddings`` in a new or empty folder.

        ``ivf`` defaults to :func:`choose_ivf_parameters`; ``source`` (the embeddings file, its SHA-256) is
        recorded, and ``calibration`` (match thresholds of the same model) carried. A folder that holds anything
        else is refused, never overwritten.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        check_embeddings(embeddings, None, source)
        directory = Path(directory).expanduser().resolve()
        with folder_lock(directory):
            _refuse_occupied(directory)
            vectors = normalized(embeddings.embeddings)
            if kind == "ivf":
                ivf = ivf or choose_ivf_parameters(len(embeddings), embeddings.dim)
            metadata: dict[str, Any] = {
                "format": INDEX_FORMAT, "kind": kind, "dim": embeddings.dim, "count": 0, "generation": 0,
                "next_id": 0, "model": embeddings.metadata.get("model"),
                "ivf": asdict(ivf) if kind == "ivf" and ivf is not None else None, "calibration": calibration,
                "sources": [], "created": _now(), "files": {}}
            index = cls(directory, metadata, _empty_float_index(kind, embeddings.dim, ivf, vectors, seed),
                        _empty_binary_index(embeddings.dim), Items.empty(),
                        np.zeros((0, embeddings.dim), np.float32) if kind == "ivf" else None)
            index._commit_generation(extra=(embeddings, vectors, source))
        return index

    # -------------------------------------------------------------------------------------- picking up changes
    def _file_stamp(self) -> tuple:
        """What changes when anyone changes the folder: index.json and the journal, by size and time."""
        stamp: list[tuple[int, int] | None] = []
        for file in (self.directory / METADATA_NAME, self._journal_path()):
            try:
                status = file.stat()
                stamp.append((status.st_size, status.st_mtime_ns))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def refresh(self) -> bool:
        """Pick up what other processes changed since (a new generation, journal lines); True when something did.
        Costs two ``stat`` calls when nothing changed."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return False
            on_disk = read_metadata(self.directory)
            if on_disk["generation"] != self.metadata["generation"]:
                fresh = SearchIndex.open(self.directory)  # loaded beside, swapped in at once
                (self.metadata, self.float_index, self.binary_index, self.items, self.vectors, self.added,
                 self.removed, self.journal_end, self._stamp, self._next_id) = (
                    fresh.metadata, fresh.float_index, fresh.binary_index, fresh.items, fresh.vectors, fresh.added,
                    fresh.removed, fresh.journal_end, fresh._stamp, fresh._next_id)
                return True
            self.metadata = {**on_disk, "files": self.metadata["files"]}  # e.g. a calibration attached since
            self._replay()
            return True

    def _journal_path(self) -> Path:
        return self.directory / f"journal.{int(self.metadata['generation']):06d}.log"

    def _replay(self) -> None:
        """Apply the journal's whole lines after ``journal_end``."""
        stamp = self._file_stamp()
        changes, end = journal.read(self._journal_path(), self.journal_end)
        for change in changes:
            self._apply(change)
        self.journal_end, self._stamp = end, stamp

    def _apply(self, change: Change) -> None:
        if change.op == "add":
            vectors = np.stack([record.vector for record in change.records]).astype(np.float32)
            ids = np.array([record.id for record in change.records], dtype=np.int64)
            if self.float_index is not None:
                self.float_index.add_with_ids(vectors, ids)
            self.binary_index.add_with_ids(binary_codes(vectors), ids)
            for record in change.records:
                self.added[record.id] = record
            self._next_id = max(self._next_id, int(ids.max()) + 1)
            return
        ids = np.array([i for i in change.ids if i in self.added or self.items.row(i) is not None], dtype=np.int64)
        if len(ids):
            selector = faiss.IDSelectorBatch(ids)
            if self.float_index is not None:
                self.float_index.remove_ids(selector)
            self.binary_index.remove_ids(selector)
        for item_id in ids.tolist():
            if self.added.pop(item_id, None) is None:
                self.removed.add(item_id)

    # -------------------------------------------------------------------------------------- changing
    def add_items(self, vectors, paths: list[str], labels: list[str | None] | None = None,
                  metadata: list[dict | None] | None = None, *, before_commit=None) -> list[int]:
        """Add items durably (one journal line, fsynced) and return their new ids.

        ``before_commit(ids)`` runs with the ids decided and the folder locked, before the journal line is
        written: the service stores uploaded images under their ids there, so that a committed item's image is
        always on disk. An exception from it, or a full disk, leaves the collection as it was.
        """
        vectors = normalized(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dims, the index {self.dim}")
        count = len(vectors)
        labels = labels or [None] * count
        metadata = metadata or [None] * count
        if not (len(paths) == len(labels) == len(metadata) == count):
            raise ValueError("one path, label and metadata entry per vector")
        with folder_lock(self.directory), self._lock:
            self.refresh()
            first = self.next_id
            ids = list(range(first, first + count))
            if before_commit is not None:
                paths = before_commit(ids) or paths
            records = [ItemRecord(i, str(p), None if lab is None else str(lab), meta, vector)
                       for i, p, lab, meta, vector in zip(ids, paths, labels, metadata, vectors, strict=True)]
            self._journal(Change("add", records, ids))
        return ids

    def remove(self, item_ids) -> list[int]:
        """Remove items durably; returns the ids that were there (others: KeyError, nothing removed)."""
        wanted = sorted({int(i) for i in item_ids})
        with folder_lock(self.directory), self._lock:
            self.refresh()
            for item_id in wanted:
                self.record(item_id)  # KeyError names a missing or removed id, before anything changes
            if wanted:
                self._journal(Change("remove", [], wanted))
        return wanted

    def _journal(self, change: Change) -> None:
        """Write ``change`` durably, then apply it (call with both locks held)."""
        ensure_free_space(self.directory, 2 * len(journal.encode(change)) + (1 << 20), "the index change")
        self.journal_end = journal.append(self._journal_path(), change, self.journal_end)
        self._apply(change)
        self._stamp = self._file_stamp()
        if self.journal_end > COMPACT_BYTES or self._journal_changes() > COMPACT_CHANGES:
            self._commit_generation()

    def _journal_changes(self) -> int:
        return len(self.added) + len(self.removed)

    def add(self, embeddings: EmbeddingsFile, source: dict | None = None) -> range:
        """Append an embeddings file (same model and dim) as a new generation; returns the new items' ids."""
        check_embeddings(embeddings, self, source)
        with folder_lock(self.directory), self._lock:
            self.refresh()
            first = self.next_id
            self._commit_generation(extra=(embeddings, normalized(embeddings.embeddings), source))
        return range(first, first + len(embeddings))

    def compact(self) -> dict:
        """Fold the journal into a new generation (``normsoftmax index compact``)."""
        with folder_lock(self.directory), self._lock:
            self.refresh()
            self._commit_generation()
        return self.describe()

    def _commit_generation(self, extra: tuple | None = None) -> None:
        """Write the state (and ``extra``: an embeddings file's items) as the next generation and commit it. On a
        failure the folder keeps its committed generation, and this object is reloaded from it."""
        try:
            first = self.next_id
            items = self.items.merged(self.removed, self.added)
            vectors = self._merged_vectors()
            sources = list(self.metadata["sources"])
            if extra is not None:
                embeddings, normalized_vectors, source = extra
                ids = np.arange(first, first + len(embeddings), dtype=np.int64)
                if self.float_index is not None:
                    self.float_index.add_with_ids(normalized_vectors, ids)
                self.binary_index.add_with_ids(binary_codes(normalized_vectors), ids)
                items = items.then(_items_of_file(embeddings, ids))
                if vectors is not None:
                    vectors = np.concatenate([vectors, normalized_vectors])
                sources.append({**(source or {}), "count": len(embeddings), "first_id": int(first), "added": _now()})
                next_id = first + len(embeddings)
            else:
                next_id = first
            generation = self.metadata["generation"] + 1
            files = self._write_generation(generation, items, vectors)
            metadata = {**self.metadata, "format": INDEX_FORMAT, "count": len(items), "generation": generation,
                        "next_id": int(next_id), "files": files, "sources": sources}
            atomic_write(self.directory / METADATA_NAME, json.dumps(metadata, indent=2) + "\n", durable=True)
        except BaseException:
            if (self.directory / METADATA_NAME).exists():
                committed = SearchIndex.open(self.directory)
                (self.metadata, self.float_index, self.binary_index, self.items, self.vectors, self.added,
                 self.removed, self.journal_end) = (
                    committed.metadata, committed.float_index, committed.binary_index, committed.items,
                    committed.vectors, committed.added, committed.removed, committed.journal_end)
                self._stamp, self._next_id = committed._stamp, committed._next_id
            raise
        self.metadata, self.items, self.added, self.removed, self.journal_end = metadata, items, {}, set(), 0
        self._next_id = int(next_id)
        if vectors is not None:
            self.vectors = np.load(self.directory / files["vectors"]["name"], mmap_mode="r")
        self._remove_unreferenced()
        self._stamp = self._file_stamp()

    def _merged_vectors(self) -> np.ndarray | None:
        if self.vectors is None:
            return None
        keep = ~np.isin(self.items.ids, list(self.removed)) if self.removed else slice(None)
        added = [self.added[i].vector for i in sorted(self.added)]
        return np.concatenate([np.asarray(self.vectors)[keep], *([np.stack(added)] if added else [])]).astype(
            np.float32)

    def _write_generation(self, generation: int, items: Items, vectors: np.ndarray | None) -> dict:
        self._remove_unreferenced()  # an unfinished generation left by a crash
        names = {"items": f"items.{generation:06d}.npz", "binary": f"binary.{generation:06d}.faiss"}
        if self.float_index is not None:
            names["float"] = f"float.{generation:06d}.faiss"
            with atomic_output(self.directory / names["float"], durable=True) as temporary:
                faiss.write_index(self.float_index, str(temporary))
        with atomic_output(self.directory / names["binary"], durable=True) as temporary:
            faiss.write_index_binary(self.binary_index, str(temporary))
        items.write(self.directory / names["items"])
        if vectors is not None:
            names["vectors"] = f"vectors.{generation:06d}.npy"
            with atomic_output(self.directory / names["vectors"], durable=True) as temporary, \
                    open(temporary, "wb") as handle:
                np.save(handle, vectors)
        return {role: {"name": name, "bytes": (self.directory / name).stat().st_size} for role, name in names.items()}

    def _remove_unreferenced(self) -> None:
        """Delete files of generations other than the committed one, and uploaded images of ids not in the
        collection (call with the folder locked)."""
        committed = read_metadata(self.directory) if (self.directory / METADATA_NAME).exists() else {}
        keep = {entry["name"] for entry in committed.get("files", {}).values()} | {METADATA_NAME, LOCK_NAME}
        if committed:
            keep.add(f"journal.{int(committed['generation']):06d}.log")
        for file in self.directory.iterdir():
            if file.name not in keep and _is_our_file(file.name) and file.is_file():
                file.unlink(missing_ok=True)
        images = self.directory / IMAGES_FOLDER
        if committed and images.is_dir():
            live = set(self.ids().tolist())
            for file in images.iterdir():
                stem = file.name.split(".", 1)[0]
                if file.is_file() and (not stem.isdigit() or int(stem) not in live) and not file.name.startswith("."):
                    file.unlink(missing_ok=True)

    # -------------------------------------------------------------------------------------- searching
    def search(self, vectors, k: int = 10, kind: str = "float", nprobe: int | None = None) -> Neighbours:
        """The ``k`` nearest items of each query vector (N x dim): by cosine (``float``; approximate for IVF, with
        ``nprobe`` lists searched, default the index's) or by Hamming distance between sign bits (``binary``;
        hits at equal distance are listed by id)."""
        vectors = normalized(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"queries have {vectors.shape[1]} dims, the index {self.dim}")
        if kind == "binary":
            return self._search_codes(binary_codes(vectors), k)
        return self._search_float(vectors, k, nprobe)

    def search_items(self, item_ids, k: int = 10, kind: str = "float", nprobe: int | None = None) -> Neighbours:
        """Search with items already in the index as queries (their exact stored vectors or codes)."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        with self._lock:
            if kind == "binary":
                self._require("binary")
                return self._search_codes(self.codes_of(item_ids), k)
            return self._search_float(self.vectors_of(item_ids), k, nprobe)

    def _check_ids(self, item_ids: np.ndarray) -> None:
        missing = item_ids[~np.isin(item_ids, self.ids())]
        if len(missing):
            raise KeyError(self._no_item(int(missing[0])))

    def vectors_of(self, item_ids) -> np.ndarray:
        """The exact (L2-normalised float32) vectors of items; KeyError for an id not in the collection."""
        self._require("float")
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(item_ids), self.dim), np.float32)
        with self._lock:
            self._check_ids(item_ids)
            for position, item_id in enumerate(item_ids.tolist()):
                if item_id in self.added:
                    out[position] = self.added[item_id].vector
                elif self.vectors is not None:
                    out[position] = self.vectors[self.items.row(item_id)]
                else:  # a flat index gives its vectors back exactly (an IVF index of format 1: approximately)
                    ivf = faiss.try_extract_index_ivf(self.float_index)
                    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                    out[position] = self.float_index.reconstruct(item_id)
        return out

    def codes_of(self, item_ids) -> np.ndarray:
        """The packed sign bits of items; KeyError for an id not in the collection."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        with self._lock:
            self._check_ids(item_ids)
            if not len(item_ids):
                return np.zeros((0, self.binary_index.code_size), np.uint8)
            return np.stack([self.binary_index.reconstruct(int(i)) for i in item_ids])

    def _require(self, kind: str) -> None:
        check_kind(kind, self.kinds, f"{self.directory} is a {self.kind} index: it")

    def _search_float(self, vectors: np.ndarray, k: int, nprobe: int | None) -> Neighbours:
        self._require("float")
        k = check_k(k)
        params = None
        if self.ivf:
            nprobe = nprobe or self.ivf.nprobe
            params = faiss.SearchParametersIVF(nprobe=int(min(max(1, nprobe), self.ivf.nlist)))
        with self._lock:
            size = self.count
            if size == 0:
                return _nothing("float", len(vectors), k)
            scores, ids = self.float_index.search(vectors, min(k, size), params=params)
        return Neighbours("float", ids.astype(np.int64), scores.astype(np.float32))

    def _search_codes(self, codes: np.ndarray, k: int) -> Neighbours:
        self._require("binary")
        with self._lock:
            k = min(check_k(k), self.count)
            if k == 0:
                return _nothing("binary", len(codes), 1)
            distances, ids = self.binary_index.search(np.ascontiguousarray(codes, dtype=np.uint8), k)
        order = np.lexsort((ids, distances), axis=1) if len(ids) else np.zeros_like(ids)  # ties by id: stable
        distances, ids = np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
        scores = (1.0 - distances / self.dim).astype(np.float32)
        return Neighbours("binary", ids.astype(np.int64), scores, distances.astype(np.int64))

    def hits(self, neighbours: Neighbours, row: int, limit: int | None = None) -> list[dict]:
        """Row ``row`` of a search as dicts: id, path, score (+ label, metadata, hamming for binary); no padding.
        An item removed between the search and this call is left out."""
        return hits_of(self, neighbours, row, limit)


def hits_of(index, neighbours: Neighbours, row: int, limit: int | None = None) -> list[dict]:
    """Row ``row`` of a search of any backend as dicts (``index.item`` gives each hit's record)."""
    found = []
    for column, item_id in enumerate(neighbours.ids[row][:limit]):
        if item_id < 0:
            continue
        try:
            hit = {**index.item(int(item_id)), "score": float(neighbours.scores[row, column])}
        except KeyError:
            continue
        if neighbours.hamming is not None:
            hit["hamming"] = int(neighbours.hamming[row, column])
        found.append(hit)
    return found


def _nothing(kind: str, rows: int, k: int) -> Neighbours:
    return Neighbours(kind, np.full((rows, k), -1, np.int64), np.zeros((rows, k), np.float32),
                      np.zeros((rows, k), np.int64) if kind == "binary" else None)


def check_model(recorded: dict | None, model, where: str) -> None:
    """Refuse a model other than the one that embedded a collection: its vectors would not be comparable."""
    recorded = recorded or {}
    if not recorded.get("digest"):
        raise ValueError(f"{where} records no model (its embeddings file had no model metadata), so queries cannot "
                         f"be checked against it; rebuild it from `normsoftmax embed` output")
    if getattr(model, "digest", None) != recorded["digest"]:
        raise ValueError(
            f"this index was built with model {recorded['digest'][:16]} ({recorded.get('checkpoint')}), the "
            f"checkpoint {getattr(model, 'checkpoint', '?')} is model {str(getattr(model, 'digest', None))[:16]}: "
            f"their embeddings are not comparable; use the checkpoint that embedded the index, or re-embed the "
            f"images with this one and build a new index")


# ------------------------------------------------------------------------------------------ helpers
def _items_of_file(embeddings: EmbeddingsFile, ids: np.ndarray) -> Items:
    """The items of an embeddings file, its labels named by its label names (by their number without names)."""
    given = embeddings.metadata.get("label_names")
    names: list[str] = []
    labels = np.full(len(embeddings), -1, dtype=np.int64)
    if embeddings.labels is not None:
        values, inverse = np.unique(embeddings.labels, return_inverse=True)
        value_names = [str(given[v]) if given and 0 <= v < len(given) else str(int(v)) for v in values]
        names = sorted(set(value_names))
        lookup = {name: i for i, name in enumerate(names)}
        labels = np.array([lookup[name] for name in value_names], dtype=np.int64)[inverse.reshape(-1)]
    encoded = [str(path).encode("utf-8", "surrogateescape") for path in embeddings.paths]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return Items(ids, np.frombuffer(b"".join(encoded), np.uint8).copy(),
                 np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), labels, names)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_embeddings(embeddings: EmbeddingsFile, index, source: dict | None) -> None:
    """Refuse embeddings that cannot go (into ``index``): empty, another dim, another model, added already."""
    name = (source or {}).get("file", "the embeddings")
    if len(embeddings) == 0:
        raise ValueError(f"{name} holds no embeddings")
    if index is None:
        return
    if embeddings.dim != index.dim:
        raise ValueError(f"{name} holds {embeddings.dim}-dimensional embeddings, the index at {index.location} "
                         f"{index.dim}-dimensional ones")
    theirs = (embeddings.metadata.get("model") or {}).get("digest")
    if theirs != index.digest:
        raise ValueError(f"{name} was embedded by model {str(theirs)[:16]}, the index at {index.location} by model "
                         f"{str(index.digest)[:16]}: vectors of different models are not comparable; embed the "
                         f"images with {(index.model or {}).get('checkpoint', 'the index model')}")
    digest = (source or {}).get("sha256")
    for earlier in index.metadata["sources"]:
        if digest and earlier.get("sha256") == digest:
            last = earlier["first_id"] + earlier["count"] - 1
            raise ValueError(f"{name} is already in the index at {index.location} (ids {earlier['first_id']} to "
                             f"{last}, added {earlier.get('added')}); nothing was added")


def _refuse_occupied(directory: Path) -> None:
    if (directory / METADATA_NAME).exists():
        metadata = read_metadata(directory)
        built_from = ", ".join(str(s.get("file", "?")) for s in metadata.get("sources", [])) or "unknown files"
        raise ValueError(
            f"{directory} already holds an index ({metadata.get('count')} items, kind {metadata.get('kind')}, model "
            f"{str((metadata.get('model') or {}).get('digest'))[:16]}, built from {built_from}); to append use "
            f"`normsoftmax index add {directory} EMBEDDINGS.npz`, to replace it delete the folder first, or choose "
            f"another --out")
    others = sorted(p.name for p in directory.iterdir() if not _is_our_file(p.name))
    if others:
        raise ValueError(f"{directory} is not empty and not an index folder (it holds {', '.join(others[:5])}"
                         f"{', ...' if len(others) > 5 else ''}); choose a new or empty folder for --out")


def _trained_ivf(vectors: np.ndarray, ivf: IvfParameters, seed: int):
    """An empty IVF-PQ index (inner product) trained on ``ivf.train_count`` vectors sampled with ``seed``."""
    index = faiss.index_factory(vectors.shape[1], f"IVF{ivf.nlist},PQ{ivf.pq_m}x{PQ_BITS}", faiss.METRIC_INNER_PRODUCT)
    # The factory turns on polysemous training (Hamming filtering of PQ codes), which we never use and which
    # costs more than the rest of training together.
    index.do_polysemous_training = False
    index.nprobe = ivf.nprobe
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(vectors), size=ivf.train_count, replace=False)) \
        if ivf.train_count < len(vectors) else slice(None)
    index.train(np.ascontiguousarray(vectors[sample]))
    return index


__all__ = ["SearchIndex", "Neighbours", "Items", "ItemRecord", "IvfParameters", "choose_ivf_parameters",
           "binary_codes", "normalized", "KINDS", "SEARCH_KINDS", "SCORE_NAMES", "MIN_IVF_VECTORS", "INDEX_FORMAT",
           "METADATA_NAME", "IMAGES_FOLDER", "check_model", "hits_of", "folder_lock", "read_metadata"]

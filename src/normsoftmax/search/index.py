"""Faiss indexes over embeddings, and the folder that keeps them with what their ids mean.

An index folder holds::

    index.json                  what the folder holds (model, dim, kinds, count, IVF parameters, sources,
                                and the names of the files below); replaced last: the commit point
    float.<generation>.faiss    ``IndexFlatIP`` (exact cosine: vectors are L2-normalised) or IVF-PQ
                                (approximate, for millions of vectors); absent for ``binary`` indexes
    binary.<generation>.faiss   ``IndexBinaryFlat`` over the sign bits (bit = x > 0): exact Hamming
    items.<generation>.npz      id -> path, label (-1: unknown) and the label names

Ids are the rows in the order items were added: 0 .. count - 1. Every change (``create``, ``add``) writes a
complete new generation of the three files, then replaces ``index.json``, and only then deletes the previous
generation; a crash at any moment leaves ``index.json`` naming one complete, mutually consistent generation
(an unfinished generation's files are removed by the next change). Changes hold an exclusive lock on the
folder, so two ``index add`` never interleave.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..embedding.files import EmbeddingsFile
from ..files import atomic_output, atomic_write

INDEX_FORMAT = 1
METADATA_NAME = "index.json"
LOCK_NAME = ".lock"
# index kind -> the searchable representations it stores
KINDS = {"flat": ("float", "binary"), "ivf": ("float", "binary"), "binary": ("binary",)}
SEARCH_KINDS = ("float", "binary")
# What a search's scores mean, per representation (higher is always more similar).
SCORE_NAMES = {"float": "cosine", "binary": "bit agreement (1 - Hamming distance / dim)"}

# faiss's k-means wants at least 39 training points per centroid (it warns below); PQ sub-quantizers of 8 bits
# have 256 centroids each, so IVF-PQ cannot be trained sensibly on fewer vectors than this.
POINTS_PER_CENTROID = 39
PQ_BITS = 8
MIN_IVF_VECTORS = POINTS_PER_CENTROID * 2**PQ_BITS


# ------------------------------------------------------------------------------------------ IVF parameters
@dataclass(frozen=True)
class IvfParameters:
    """How an IVF-PQ index is laid out: ``nlist`` coarse lists, ``nprobe`` of them searched per query,
    ``pq_m`` sub-quantizers of 8 bits (``pq_m`` bytes per vector), trained on ``train_count`` vectors."""

    nlist: int
    nprobe: int
    pq_m: int
    train_count: int


def _power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1.0))))


def _default_pq_m(dim: int) -> int:
    """dim / 16, at least 8 (or dim itself when smaller), rounded up to a divisor of dim (PQ splits dim evenly)."""
    target = min(dim, max(8, dim // 16))
    return next(m for m in range(target, dim + 1) if dim % m == 0)


def choose_ivf_parameters(count: int, dim: int, nlist: int | None = None, nprobe: int | None = None,
                          pq_m: int | None = None, train_size: int = 100_000) -> IvfParameters:
    """IVF-PQ parameters for ``count`` vectors of ``dim`` dimensions; explicit values are checked, not changed.

    Defaults: ``nlist`` the power of two nearest 4 sqrt(count), lowered until every list has
    :data:`POINTS_PER_CENTROID` training vectors; ``nprobe`` nlist / 16; ``pq_m`` dim / 16 (at least 8).
    """
    if count < MIN_IVF_VECTORS:
        raise ValueError(
            f"IVF-PQ needs at least {MIN_IVF_VECTORS:,} vectors to train ({POINTS_PER_CENTROID} per centroid for the "
            f"{2**PQ_BITS} codes of each PQ sub-quantizer), and there are {count:,}; use --kind flat: exact search "
            f"that stays fast up to a few million vectors")
    train_count = min(count, max(train_size, MIN_IVF_VECTORS))
    if nlist is None:
        nlist = _power_of_two(4 * math.sqrt(count))
        while nlist > 1 and nlist * POINTS_PER_CENTROID > train_count:
            nlist //= 2
    elif nlist < 1 or nlist * POINTS_PER_CENTROID > train_count:
        raise ValueError(f"nlist {nlist} needs {max(1, nlist) * POINTS_PER_CENTROID:,} training vectors "
                         f"({POINTS_PER_CENTROID} per list) and {train_count:,} are used; lower --nlist"
                         + (" or raise --train_size" if train_count < count else ""))
    if nprobe is None:
        nprobe = max(1, nlist // 16)
    elif not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe must be between 1 and nlist ({nlist}), got {nprobe}")
    if pq_m is None:
        pq_m = _default_pq_m(dim)
    elif pq_m < 1 or dim % pq_m:
        raise ValueError(f"pq_m must divide the embedding dimension {dim}, got {pq_m}")
    return IvfParameters(nlist=int(nlist), nprobe=int(nprobe), pq_m=int(pq_m), train_count=int(train_count))


# ------------------------------------------------------------------------------------------ vectors
def normalized(vectors) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy (inner products are then cosines; zero rows stay zero)."""
    copy = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if copy.ndim != 2:
        raise ValueError(f"expected an N x D array of vectors, got shape {copy.shape}")
    faiss.normalize_L2(copy)
    return copy


def binary_codes(vectors) -> np.ndarray:
    """Sign bits (x > 0), packed 8 per byte, zero-padded to whole bytes: (N, ceil(D / 8)) uint8."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


@dataclass
class Neighbours:
    """A search's answer: ``ids`` (n, k), -1 where fewer than k items were found, and ``scores`` (n, k), higher
    more similar (``SCORE_NAMES[kind]``); binary searches also give the Hamming distances."""

    kind: str
    ids: np.ndarray
    scores: np.ndarray
    hamming: np.ndarray | None = None


# ------------------------------------------------------------------------------------------ the folder
@contextlib.contextmanager
def _folder_lock(directory: Path):
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
    """Files an index folder may hold besides index.json: generations, the lock, atomic_output's temporaries."""
    return (name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp"))
            or any(name.startswith(prefix) and name.endswith(suffix)
                   for prefix, suffix in (("float.", ".faiss"), ("binary.", ".faiss"), ("items.", ".npz"))))


def _read_metadata(directory: Path) -> dict:
    file = directory / METADATA_NAME
    if not file.is_file():
        hint = "" if directory.is_dir() else " (the folder does not exist)"
        raise FileNotFoundError(f"{directory} is not an index folder: no {METADATA_NAME}{hint}; "
                                f"build one with `normsoftmax index build EMBEDDINGS.npz --out {directory}`")
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error}); the index folder is damaged") from None
    if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT:
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
    return index


@dataclass
class Items:
    """What the ids mean: every id's image path, its label (-1: unknown) and the label names.

    Paths are kept as UTF-8 bytes back to back with offsets, not as Python strings or a fixed-width numpy
    string array: a million paths of ~100 characters then take ~100 MB, not 400 MB (UTF-32, padded to the
    longest) or more. File names that are not valid UTF-8 survive (``surrogateescape``, as the OS gave them).
    """

    path_bytes: np.ndarray  # uint8
    offsets: np.ndarray  # int64, count + 1: path i is path_bytes[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64, count
    label_names: list[str]

    @classmethod
    def empty(cls) -> Items:
        return cls(np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int64), [])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def path(self, item_id: int) -> str:
        start, end = self.offsets[item_id], self.offsets[item_id + 1]
        return self.path_bytes[start:end].tobytes().decode("utf-8", "surrogateescape")

    def extended(self, embeddings: EmbeddingsFile) -> Items:
        """These items followed by ``embeddings``'s; its labels are mapped into this label-name list by name
        (labels without names are named by their number)."""
        names = list(self.label_names)
        labels = np.full(len(embeddings), -1, dtype=np.int64)
        if embeddings.labels is not None:
            given = embeddings.metadata.get("label_names")
            lookup = {name: i for i, name in enumerate(names)}
            values, inverse = np.unique(embeddings.labels, return_inverse=True)
            targets = np.empty(len(values), dtype=np.int64)
            for position, value in enumerate(values):
                name = str(given[value]) if given and 0 <= value < len(given) else str(int(value))
                if name not in lookup:
                    lookup[name] = len(names)
                    names.append(name)
                targets[position] = lookup[name]
            labels = targets[inverse.reshape(-1)]
        encoded = [str(path).encode("utf-8", "surrogateescape") for path in embeddings.paths]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets = self.offsets[-1] + np.cumsum(lengths)
        return Items(np.concatenate([self.path_bytes, np.frombuffer(b"".join(encoded), np.uint8)]),
                     np.concatenate([self.offsets, offsets]), np.concatenate([self.labels, labels]), names)

    def write(self, file: Path) -> None:
        with atomic_output(file, durable=True) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, path_bytes=self.path_bytes, offsets=self.offsets, labels=self.labels,
                     label_names=np.asarray(self.label_names, dtype=str).reshape(-1))

    @classmethod
    def read(cls, file: Path, count: int) -> Items:
        try:
            with np.load(file, allow_pickle=False) as data:
                items = cls(data["path_bytes"], data["offsets"].astype(np.int64), data["labels"].astype(np.int64),
                            [str(n) for n in data["label_names"]])
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
            raise ValueError(f"{file}: cannot be read as the index's items ({error})") from None
        consistent = (items.offsets.shape == (count + 1,) and items.labels.shape == (count,)
                      and items.offsets[0] == 0 and items.offsets[-1] == len(items.path_bytes)
                      and bool(np.all(np.diff(items.offsets) >= 0)))
        if not consistent:
            raise ValueError(f"{file}: does not hold the paths of {count} items; the index folder is damaged")
        return items


# ------------------------------------------------------------------------------------------ the index
class SearchIndex:
    """An index folder, open: search by vectors or by stored items, append embeddings, map ids to paths.

    Searching is thread-safe (faiss searches are read-only); ``add`` is not meant to run while other
    threads search the same object.
    """

    def __init__(self, directory: Path, metadata: dict, float_index, binary_index, items: Items):
        self.directory = directory
        self.metadata = metadata
        self.float_index = float_index
        self.binary_index = binary_index
        self.items = items
        self._direct_map_lock = threading.Lock()

    # -------------------------------------------------------------------------------------- description
    @property
    def count(self) -> int:
        return int(self.metadata["count"])

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
    def ivf(self) -> IvfParameters | None:
        return IvfParameters(**self.metadata["ivf"]) if self.metadata.get("ivf") else None

    def describe(self) -> dict:
        """path, count, kinds (and nlist, nprobe for IVF): what ``normsoftmax index build/add`` print."""
        info = {"path": str(self.directory), "count": self.count, "kinds": list(self.kinds), "kind": self.kind,
                "dim": self.dim}
        if self.ivf:
            info.update(nlist=self.ivf.nlist, nprobe=self.ivf.nprobe, pq_m=self.ivf.pq_m)
        return info

    def path_of(self, item_id: int) -> str:
        """The image path of ``item_id``; KeyError when the index has no such id."""
        if not 0 <= int(item_id) < self.count:
            raise KeyError(f"no item {item_id}: the index holds ids 0 to {self.count - 1}")
        return self.items.path(int(item_id))

    def item(self, item_id: int) -> dict:
        """id, path and (when known) label of ``item_id``."""
        entry = {"id": int(item_id), "path": self.path_of(item_id)}
        label = int(self.items.labels[int(item_id)])
        if label >= 0:
            entry["label"] = self.items.label_names[label]
        return entry

    def check_model(self, model) -> None:
        """Refuse a model other than the one that embedded this index: its vectors would not be comparable."""
        recorded = self.model or {}
        if not recorded.get("digest"):
            raise ValueError(f"{self.directory} records no model (its embeddings file had no model metadata), so "
                             f"queries cannot be checked against it; rebuild it from `normsoftmax embed` output")
        if getattr(model, "digest", None) != recorded["digest"]:
            raise ValueError(
                f"this index was built with model {recorded['digest'][:16]} ({recorded.get('checkpoint')}), the "
                f"checkpoint {getattr(model, 'checkpoint', '?')} is model {str(getattr(model, 'digest', None))[:16]}: "
                f"their embeddings are not comparable; use the checkpoint that embedded the index, or re-embed the "
                f"images with this one and build a new index")

    # -------------------------------------------------------------------------------------- opening, creating
    @classmethod
    def open(cls, directory: str | os.PathLike) -> SearchIndex:
        """Open an index folder; FileNotFoundError / ValueError name what is missing or damaged."""
        directory = Path(directory).expanduser().resolve()
        metadata = _read_metadata(directory)
        float_index = _read_faiss(directory, metadata, "float") if "float" in KINDS[metadata["kind"]] else None
        binary_index = _read_faiss(directory, metadata, "binary")
        items = Items.read(_check_file(directory, metadata, "items"), metadata["count"])
        return cls(directory, metadata, float_index, binary_index, items)

    @classmethod
    def create(cls, directory: str | os.PathLike, embeddings: EmbeddingsFile, kind: str = "flat", *,
               ivf: IvfParameters | None = None, seed: int = 0, source: dict | None = None) -> SearchIndex:
        """Build an index of ``kind`` (flat, binary, ivf) from ``embeddings`` in a new or empty folder.

        ``ivf`` defaults to :func:`choose_ivf_parameters`; ``source`` (the embeddings file, its SHA-256) is
        recorded. A folder that holds anything else is refused, never overwritten.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        _check_embeddings(embeddings, None, source)
        directory = Path(directory).expanduser().resolve()
        with _folder_lock(directory):
            _refuse_occupied(directory)
            float_index = None
            if kind == "ivf":
                ivf = ivf or choose_ivf_parameters(len(embeddings), embeddings.dim)
                float_index = _trained_ivf(normalized(embeddings.embeddings), ivf, seed)
            elif kind == "flat":
                float_index = faiss.IndexFlatIP(embeddings.dim)
            binary_index = faiss.IndexBinaryFlat(8 * math.ceil(embeddings.dim / 8))
            metadata: dict[str, Any] = {
                "format": INDEX_FORMAT, "kind": kind, "dim": embeddings.dim, "count": 0, "generation": 0,
                "model": embeddings.metadata.get("model"),
                "ivf": asdict(ivf) if kind == "ivf" and ivf is not None else None, "sources": [], "created": _now()}
            index = cls(directory, metadata, float_index, binary_index, Items.empty())
            index._append(embeddings, source)
        return index

    def add(self, embeddings: EmbeddingsFile, source: dict | None = None) -> range:
        """Append ``embeddings`` (same model and dim) and commit; returns the new items' ids."""
        _check_embeddings(embeddings, self, source)
        with _folder_lock(self.directory):
            on_disk = _read_metadata(self.directory)
            if on_disk.get("generation") != self.metadata["generation"]:
                raise ValueError(f"{self.directory} was changed by another process since it was opened; open it again")
            first = self.count
            self._append(embeddings, source)
        return range(first, self.count)

    def _append(self, embeddings: EmbeddingsFile, source: dict | None) -> None:
        """Add to the faiss indexes, write the next generation, commit it. On a failure the folder keeps its
        committed generation and this object is reloaded from it."""
        vectors = normalized(embeddings.embeddings)
        try:
            if self.float_index is not None:
                self.float_index.add(vectors)
            self.binary_index.add(binary_codes(vectors))
            items = self.items.extended(embeddings)
            generation = self.metadata["generation"] + 1
            files = self._write_generation(generation, items)
            sources = self.metadata["sources"] + [{**(source or {}), "count": len(embeddings),
                                                   "first_id": self.count, "added": _now()}]
            metadata = {**self.metadata, "count": len(items), "generation": generation, "files": files,
                        "sources": sources}
            atomic_write(self.directory / METADATA_NAME, json.dumps(metadata, indent=2) + "\n", durable=True)
        except BaseException:
            if (self.directory / METADATA_NAME).exists():
                committed = SearchIndex.open(self.directory)
                self.metadata, self.float_index, self.binary_index, self.items = (
                    committed.metadata, committed.float_index, committed.binary_index, committed.items)
            raise
        self.metadata, self.items = metadata, items
        self._remove_unreferenced()

    def _write_generation(self, generation: int, items: Items) -> dict:
        self._remove_unreferenced()  # an unfinished generation left by a crash
        names = {"items": f"items.{generation:06d}.npz", "binary": f"binary.{generation:06d}.faiss"}
        if self.float_index is not None:
            names["float"] = f"float.{generation:06d}.faiss"
            with atomic_output(self.directory / names["float"], durable=True) as temporary:
                faiss.write_index(self.float_index, str(temporary))
        with atomic_output(self.directory / names["binary"], durable=True) as temporary:
            faiss.write_index_binary(self.binary_index, str(temporary))
        items.write(self.directory / names["items"])
        return {role: {"name": name, "bytes": (self.directory / name).stat().st_size} for role, name in names.items()}

    def _remove_unreferenced(self) -> None:
        """Delete files of generations other than the committed one (call with the folder locked)."""
        committed = _read_metadata(self.directory) if (self.directory / METADATA_NAME).exists() else {}
        keep = {entry["name"] for entry in committed.get("files", {}).values()} | {METADATA_NAME, LOCK_NAME}
        for file in self.directory.iterdir():
            if file.name not in keep and _is_our_file(file.name) and file.is_file():
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
        """Search with items already in the index as queries (their stored vectors or codes)."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        for item_id in item_ids:
            self.path_of(item_id)  # KeyError for ids outside the index
        if kind == "binary":
            codes = np.stack([self.binary_index.reconstruct(int(i)) for i in item_ids]) if len(item_ids) else \
                np.zeros((0, self.binary_index.code_size), np.uint8)
            return self._search_codes(codes, k)
        self._require("float")
        if self.ivf:
            with self._direct_map_lock:  # IVF lists need an id -> (list, offset) map to give vectors back
                if faiss.extract_index_ivf(self.float_index).direct_map.type == 0:
                    faiss.extract_index_ivf(self.float_index).make_direct_map()
        vectors = self.float_index.reconstruct_batch(item_ids) if len(item_ids) else np.zeros((0, self.dim), np.float32)
        return self._search_float(np.ascontiguousarray(vectors, dtype=np.float32), k, nprobe)

    def _require(self, kind: str) -> None:
        if kind not in SEARCH_KINDS:
            raise ValueError(f"kind must be float or binary, got {kind!r}")
        if kind not in self.kinds:
            raise ValueError(f"{self.directory} is a {self.kind} index: it holds only {', '.join(self.kinds)} codes")

    def _search_float(self, vectors: np.ndarray, k: int, nprobe: int | None) -> Neighbours:
        self._require("float")
        k = _check_k(k)
        params = None
        if self.ivf:
            nprobe = nprobe or self.ivf.nprobe
            params = faiss.SearchParametersIVF(nprobe=int(min(max(1, nprobe), self.ivf.nlist)))
        scores, ids = self.float_index.search(vectors, min(k, self.count), params=params)
        return Neighbours("float", ids.astype(np.int64), scores.astype(np.float32))

    def _search_codes(self, codes: np.ndarray, k: int) -> Neighbours:
        self._require("binary")
        k = min(_check_k(k), self.count)
        distances, ids = self.binary_index.search(np.ascontiguousarray(codes, dtype=np.uint8), k)
        order = np.lexsort((ids, distances), axis=1) if len(ids) else np.zeros_like(ids)  # ties by id: stable
        distances, ids = np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
        scores = (1.0 - distances / self.dim).astype(np.float32)
        return Neighbours("binary", ids.astype(np.int64), scores, distances.astype(np.int64))

    def hits(self, neighbours: Neighbours, row: int, limit: int | None = None) -> list[dict]:
        """Row ``row`` of a search as dicts: id, path, score (+ label, + hamming for binary); no -1 padding."""
        found = []
        for column, item_id in enumerate(neighbours.ids[row][:limit]):
            if item_id < 0:
                continue
            hit = {**self.item(item_id), "score": float(neighbours.scores[row, column])}
            if neighbours.hamming is not None:
                hit["hamming"] = int(neighbours.hamming[row, column])
            found.append(hit)
        return found


# ------------------------------------------------------------------------------------------ helpers
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _check_k(k) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be a positive number of neighbours, got {k}")
    return int(k)


def _check_embeddings(embeddings: EmbeddingsFile, index: SearchIndex | None, source: dict | None) -> None:
    """Refuse embeddings that cannot go (into ``index``): empty, another dim, another model, added already."""
    name = (source or {}).get("file", "the embeddings")
    if len(embeddings) == 0:
        raise ValueError(f"{name} holds no embeddings")
    if index is None:
        return
    if embeddings.dim != index.dim:
        raise ValueError(f"{name} holds {embeddings.dim}-dimensional embeddings, the index at {index.directory} "
                         f"{index.dim}-dimensional ones")
    theirs = (embeddings.metadata.get("model") or {}).get("digest")
    if theirs != index.digest:
        raise ValueError(f"{name} was embedded by model {str(theirs)[:16]}, the index at {index.directory} by model "
                         f"{str(index.digest)[:16]}: vectors of different models are not comparable; embed the "
                         f"images with {(index.model or {}).get('checkpoint', 'the index model')}")
    digest = (source or {}).get("sha256")
    for earlier in index.metadata["sources"]:
        if digest and earlier.get("sha256") == digest:
            last = earlier["first_id"] + earlier["count"] - 1
            raise ValueError(f"{name} is already in the index at {index.directory} (ids {earlier['first_id']} to "
                             f"{last}, added {earlier.get('added')}); nothing was added")


def _refuse_occupied(directory: Path) -> None:
    if (directory / METADATA_NAME).exists():
        metadata = _read_metadata(directory)
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


__all__ = ["SearchIndex", "Neighbours", "Items", "IvfParameters", "choose_ivf_parameters", "binary_codes", "normalized",
           "KINDS", "SEARCH_KINDS", "SCORE_NAMES", "MIN_IVF_VECTORS", "INDEX_FORMAT", "METADATA_NAME"]

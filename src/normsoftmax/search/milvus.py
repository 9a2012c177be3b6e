"""A collection on a Milvus vector database, through ``pymilvus``: for collections that outgrow one machine.

The same operations as an index folder (:class:`~normsoftmax.search.index.SearchIndex`), on a Milvus collection:

* ``vector`` -- the L2-normalised float embeddings (FLOAT_VECTOR, inner product = cosine);
* ``codes`` -- the paper's binary codes as ±1 FLOAT_VECTORs, searched by inner product, which ranks exactly as
  Hamming distance does (IP = dim - 2 x Hamming). Milvus servers also have BINARY_VECTOR fields, but Milvus Lite
  refuses them ("MilvusLite does not support BinaryVector"), and a server-only path would be code nothing here
  can test;
* ``path``, ``label``, ``metadata`` (JSON) -- what an id means.

A second collection, ``<name>_normsoftmax``, holds one row: the model's digest, the dim, the kind, the next id and
the calibration -- the same description an index folder keeps in ``index.json``. Ids are allocated from it and
never reused.

Locations: ``milvus://HOST:PORT/COLLECTION`` (a Milvus standalone or cluster; ``milvus+https://`` for TLS) or
``milvus:///PATH/TO/FILE.db/COLLECTION`` (Milvus Lite: an embedded engine in a local file, the way the tests and CI
run it; one process at a time may open the file). Index types: FLAT (exact) by default; ``--kind ivf`` makes
IVF_FLAT lists and HNSW is the other choice for large collections on a server (``--milvus_index HNSW``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ..embedding.files import EmbeddingsFile
from .index import check_model, hits_of
from .items import ItemRecord
from .vectors import Neighbours, binary_codes, check_k, check_kind, normalized, plus_minus_one

MILVUS_SCHEMES = ("milvus", "milvus+https", "milvus+http")
_META_SUFFIX = "_normsoftmax"
_PATH_LENGTH = 4096
_BATCH = 1000


def is_milvus_location(location: str | os.PathLike) -> bool:
    return str(location).split("://", 1)[0] in MILVUS_SCHEMES and "://" in str(location)


def parse_location(location: str) -> tuple[str, str]:
    """(pymilvus URI, collection name) of ``milvus://HOST:PORT/NAME`` or ``milvus:///PATH/FILE.db/NAME``."""
    parsed = urlparse(location)
    if parsed.scheme not in MILVUS_SCHEMES:
        raise ValueError(f"{location}: a Milvus location starts with milvus://")
    path = parsed.path.rstrip("/")
    if not path or "/" not in path:
        raise ValueError(f"{location}: name the collection, as milvus://HOST:PORT/COLLECTION or "
                         f"milvus:///PATH/FILE.db/COLLECTION")
    prefix, collection = path.rsplit("/", 1)
    if parsed.netloc:  # a server
        scheme = "https" if parsed.scheme == "milvus+https" else "http"
        return f"{scheme}://{parsed.netloc}{prefix}", collection
    if not prefix.endswith(".db"):
        raise ValueError(f"{location}: a Milvus Lite location is milvus:///PATH/FILE.db/COLLECTION (the file ends "
                         f"in .db)")
    return prefix, collection


class MilvusIndex:
    """A Milvus collection, open; thread-safe like :class:`~normsoftmax.search.index.SearchIndex`."""

    def __init__(self, client: Any, collection: str, location: str, info: dict):
        self.client = client
        self.collection = collection
        self.location = location
        self.info = info
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------------- description
    @property
    def directory(self) -> str:  # what messages call the collection
        return self.location

    @property
    def metadata(self) -> dict:
        return self.info

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("float", "binary") if self.kind != "binary" else ("binary",)

    @property
    def model(self) -> dict | None:
        return self.info.get("model")

    @property
    def digest(self) -> str | None:
        return (self.model or {}).get("digest")

    @property
    def calibration(self) -> dict | None:
        return self.info.get("calibration")

    @property
    def next_id(self) -> int:
        return int(self.info["next_id"])

    @property
    def count(self) -> int:
        with self._lock:
            stats = self.client.query(self.collection, filter="", output_fields=["count(*)"])
            return int(stats[0]["count(*)"])

    def describe(self) -> dict:
        return {"path": self.location, "count": self.count, "kinds": list(self.kinds), "kind": self.kind,
                "dim": self.dim, "next_id": self.next_id, "backend": "milvus"}

    def check_model(self, model) -> None:
        check_model(self.model, model, self.location)

    def refresh(self) -> bool:
        """Milvus is the one copy of the collection: there is nothing to pick up."""
        return False

    # -------------------------------------------------------------------------------------- opening, creating
    @classmethod
    def open(cls, location: str) -> MilvusIndex:
        uri, collection = parse_location(location)
        client = _client(uri)
        if not client.has_collection(collection) or not client.has_collection(collection + _META_SUFFIX):
            raise FileNotFoundError(f"{location}: no normsoftmax collection {collection!r} there; build one with "
                                    f"`normsoftmax index build EMBEDDINGS.npz --out {location}`")
        # A collection is "released" after the process that made it ends (Milvus Lite) or the server restarts:
        # loading is what makes it searchable, and loading a loaded collection does nothing.
        client.load_collection(collection + _META_SUFFIX)
        rows = client.query(collection + _META_SUFFIX, filter="id == 0", output_fields=["info"])
        if not rows:
            raise ValueError(f"{location}: the collection's description is missing; the collection is damaged")
        client.load_collection(collection)
        return cls(client, collection, location, json.loads(rows[0]["info"]))

    @classmethod
    def create(cls, location: str, embeddings: EmbeddingsFile, kind: str = "flat", *, source: dict | None = None,
               calibration: dict | None = None, index_type: str | None = None) -> MilvusIndex:
        from pymilvus import DataType

        if kind not in ("flat", "ivf", "binary"):
            raise ValueError(f"kind must be flat, ivf or binary, got {kind!r}")
        uri, collection = parse_location(location)
        client = _client(uri)
        if client.has_collection(collection):
            raise ValueError(f"{location} already holds a collection {collection!r}; to append use "
                             f"`normsoftmax index add {location} EMBEDDINGS.npz`, to replace it drop it first")
        dim = embeddings.dim
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                      description="normsoftmax embeddings")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("codes", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("path", DataType.VARCHAR, max_length=_PATH_LENGTH)
        schema.add_field("label", DataType.VARCHAR, max_length=1024, nullable=True)
        schema.add_field("metadata", DataType.JSON, nullable=True)
        params = client.prepare_index_params()
        chosen = index_type or ("IVF_FLAT" if kind == "ivf" else "FLAT")
        extra = {"nlist": 1024} if chosen == "IVF_FLAT" else ({"M": 16, "efConstruction": 200}
                                                               if chosen == "HNSW" else {})
        params.add_index("vector", index_type=chosen, metric_type="IP", params=extra)
        params.add_index("codes", index_type="FLAT", metric_type="IP")  # ±1 products: exact Hamming ranking
        client.create_collection(collection, schema=schema, index_params=params)
        meta_schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        meta_schema.add_field("id", DataType.INT64, is_primary=True)
        meta_schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
        meta_schema.add_field("info", DataType.VARCHAR, max_length=65535)
        meta_params = client.prepare_index_params()
        meta_params.add_index("unused", index_type="FLAT", metric_type="L2")
        client.create_collection(collection + _META_SUFFIX, schema=meta_schema, index_params=meta_params)
        info: dict[str, Any] = {"format": 2, "backend": "milvus", "kind": kind, "dim": dim, "next_id": 0,
                                "index_type": chosen, "model": embeddings.metadata.get("model"),
                                "calibration": calibration, "sources": []}
        index = cls(client, collection, location, info)
        index._save_info()
        client.load_collection(collection)
        index.add(embeddings, source)
        return index

    def _save_info(self) -> None:
        self.client.upsert(self.collection + _META_SUFFIX,
                           [{"id": 0, "unused": [0.0, 0.0], "info": json.dumps(self.info)}])

    # -------------------------------------------------------------------------------------- changing
    def add(self, embeddings: EmbeddingsFile, source: dict | None = None) -> range:
        """Append an embeddings file; returns the new ids."""
        from .index import _items_of_file, check_embeddings  # the same checks and label naming as a folder

        if self.info["sources"] or self.next_id:
            check_embeddings(embeddings, self, source)
        vectors = normalized(embeddings.embeddings)
        with self._lock:
            first = self.next_id
            ids = np.arange(first, first + len(vectors), dtype=np.int64)
            items = _items_of_file(embeddings, ids)
            records = [items.record(row, vectors[row]) for row in range(len(items))]
            self._insert(records)
            self.info["sources"].append({**(source or {}), "count": len(vectors), "first_id": first})
            self.info["next_id"] = first + len(vectors)
            self._save_info()
        return range(first, first + len(vectors))

    def add_items(self, vectors, paths: list[str], labels: list[str | None] | None = None,
                  metadata: list[dict | None] | None = None, *, before_commit=None) -> list[int]:
        vectors = normalized(vectors)
        count = len(vectors)
        labels = labels or [None] * count
        metadata = metadata or [None] * count
        with self._lock:
            first = self.next_id
            ids = list(range(first, first + count))
            if before_commit is not None:
                paths = before_commit(ids) or paths
            self.info["next_id"] = first + count  # allocated before the insert: an id is never handed out twice
            self._save_info()
            self._insert([ItemRecord(i, str(p), lab, meta, vector)
                          for i, p, lab, meta, vector in zip(ids, paths, labels, metadata, vectors, strict=True)])
        return ids

    def _insert(self, records: list[ItemRecord]) -> None:
        for start in range(0, len(records), _BATCH):
            batch = records[start:start + _BATCH]
            vectors = np.stack([r.vector for r in batch])
            codes = plus_minus_one(vectors)
            self.client.insert(self.collection, [
                {"id": r.id, "vector": vectors[n].tolist(), "codes": codes[n].tolist(), "path": r.path,
                 "label": r.label, "metadata": r.metadata} for n, r in enumerate(batch)])
        self.client.flush(self.collection)

    def remove(self, item_ids) -> list[int]:
        wanted = sorted({int(i) for i in item_ids})
        with self._lock:
            for item_id in wanted:
                self.record(item_id)
            if wanted:
                self.client.delete(self.collection, ids=wanted)
                self.client.flush(self.collection)
        return wanted

    # -------------------------------------------------------------------------------------- items
    def _rows(self, item_ids: list[int], fields: list[str]) -> dict[int, dict]:
        found: dict[int, dict] = {}
        for start in range(0, len(item_ids), _BATCH):
            chunk = item_ids[start:start + _BATCH]
            for row in self.client.query(self.collection, filter=f"id in {list(chunk)}", output_fields=fields):
                found[int(row["id"])] = row
        return found

    def record(self, item_id: int) -> ItemRecord:
        item_id = int(item_id)
        with self._lock:
            rows = self._rows([item_id], ["path", "label", "metadata"])
        if item_id not in rows:
            reason = "it was removed" if 0 <= item_id < self.next_id else \
                f"the index holds ids 0 to {self.next_id - 1}"
            raise KeyError(f"no item {item_id}: {reason}")
        row = rows[item_id]
        return ItemRecord(item_id, row["path"], row.get("label"), row.get("metadata") or None)

    def item(self, item_id: int) -> dict:
        return self.record(item_id).describe()

    def path_of(self, item_id: int) -> str:
        return self.record(item_id).path

    def ids(self) -> np.ndarray:
        with self._lock:
            found: list[int] = []
            iterator = self.client.query_iterator(self.collection, batch_size=_BATCH, filter="",
                                                  output_fields=["id"])
            while batch := iterator.next():
                found.extend(int(row["id"]) for row in batch)
            iterator.close()
        return np.array(sorted(found), dtype=np.int64)

    def vectors_of(self, item_ids) -> np.ndarray:
        return self._field_of(item_ids, "vector")

    def codes_of(self, item_ids) -> np.ndarray:
        return binary_codes(self._field_of(item_ids, "codes"))

    def _field_of(self, item_ids, field: str) -> np.ndarray:
        wanted = [int(i) for i in np.asarray(item_ids).reshape(-1)]
        with self._lock:
            rows = self._rows(wanted, [field])
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise KeyError(f"no item {missing[0]}")
        return np.array([rows[i][field] for i in wanted], dtype=np.float32).reshape(len(wanted), self.dim)

    # -------------------------------------------------------------------------------------- searching
    def search(self, vectors, k: int = 10, kind: str = "float", nprobe: int | None = None) -> Neighbours:
        check_kind(kind, self.kinds, f"{self.location} is a {self.kind} collection: it")
        k = check_k(k)
        vectors = normalized(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"queries have {vectors.shape[1]} dims, the index {self.dim}")
        queries = plus_minus_one(vectors) if kind == "binary" else vectors
        field = "codes" if kind == "binary" else "vector"
        params: dict = {"metric_type": "IP"}
        if nprobe:
            params["params"] = {"nprobe": int(nprobe)}
        with self._lock:
            answers = self.client.search(self.collection, data=queries.tolist(), anns_field=field,
                                         limit=min(k, 16384), search_params=params, output_fields=[])
        ids = np.full((len(vectors), k), -1, np.int64)
        scores = np.zeros((len(vectors), k), np.float32)
        for row, answer in enumerate(answers):
            hits = sorted(answer, key=lambda hit: (-hit["distance"], hit["id"]))  # ties by id, as the folder
            for column, hit in enumerate(hits[:k]):
                ids[row, column], scores[row, column] = hit["id"], hit["distance"]
        if kind != "binary":
            return Neighbours("float", ids, scores)
        hamming = np.rint((self.dim - scores) / 2).astype(np.int64)
        return Neighbours("binary", ids, (1.0 - hamming / self.dim).astype(np.float32), hamming)

    def search_items(self, item_ids, k: int = 10, kind: str = "float", nprobe: int | None = None) -> Neighbours:
        return self.search(self.vectors_of(item_ids), k, kind, nprobe)

    def hits(self, neighbours: Neighbours, row: int, limit: int | None = None) -> list[dict]:
        return hits_of(self, neighbours, row, limit)


def _client(uri: str):
    from pymilvus import MilvusClient

    if not uri.startswith(("http://", "https://")):
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser().resolve())
    return MilvusClient(uri)


__all__ = ["MilvusIndex", "is_milvus_location", "parse_location", "MILVUS_SCHEMES"]

"""Where a collection lives, by its location: an index folder (faiss, the embedded default) or a Milvus collection
(``milvus://HOST:PORT/NAME``, ``milvus:///PATH/FILE.db/NAME`` for Milvus Lite). Both offer the same operations:
``search``, ``search_items``, ``hits``, ``item``, ``add``, ``add_items``, ``remove``, ``refresh``, ``check_model``,
``count``, ``kinds``, ``dim``, ``model``, ``calibration``; a new backend is a class with these and a branch here."""

from __future__ import annotations

import os
from pathlib import Path

from ..embedding.files import EmbeddingsFile
from .index import SearchIndex
from .milvus import MilvusIndex, is_milvus_location
from .vectors import IvfParameters

Collection = SearchIndex | MilvusIndex


def open_index(location: str | os.PathLike) -> Collection:
    """The collection at ``location``: an index folder, or a Milvus collection (``milvus://...``)."""
    if is_milvus_location(location):
        return MilvusIndex.open(str(location))
    return SearchIndex.open(location)


def create_index(location: str | os.PathLike, embeddings: EmbeddingsFile, kind: str = "flat", *,
                 ivf: IvfParameters | None = None, seed: int = 0, source: dict | None = None,
                 calibration: dict | None = None, milvus_index: str | None = None) -> Collection:
    if is_milvus_location(location):
        return MilvusIndex.create(str(location), embeddings, kind, source=source, calibration=calibration,
                                  index_type=milvus_index)
    return SearchIndex.create(Path(location), embeddings, kind, ivf=ivf, seed=seed, source=source,
                              calibration=calibration)


def milvus_location(uri: str, collection: str) -> str:
    """``--uri`` and ``--collection`` as one location: a server URL, or a Milvus Lite file."""
    if uri.startswith(("http://", "https://")):
        scheme = "milvus+https" if uri.startswith("https://") else "milvus"
        return f"{scheme}://{uri.split('://', 1)[1].rstrip('/')}/{collection}"
    return f"milvus://{Path(uri).expanduser().resolve()}/{collection}"


__all__ = ["open_index", "create_index", "milvus_location", "Collection"]

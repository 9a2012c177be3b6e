"""Putting embeddings to work: collections in an index folder (:mod:`.index`: faiss, its items, its journal of
changes) or on Milvus (:mod:`.milvus`), opened by location (:mod:`.backends`); the ``index`` commands
(:mod:`.command`); duplicate groups (:mod:`.duplicates`); and a search service with a page (:mod:`.service`,
:mod:`.batching`, :mod:`.uploads`, :mod:`.keys`, :mod:`.thumbnails`, ``page.html``) run by :mod:`.server`.

The service modules import FastAPI; they load only when used, so ``normsoftmax index ...`` does not pay for them.
"""

from importlib import import_module

from .backends import create_index, open_index
from .command import (
    add_to_index,
    build_index,
    compact_index,
    load_model_for,
    match_thresholds,
    remove_from_index,
    search_images,
)
from .duplicates import find_duplicates, write_duplicates
from .index import SearchIndex
from .milvus import MilvusIndex
from .vectors import IvfParameters, Neighbours, binary_codes, choose_ivf_parameters

_SERVICE = {"create_app": "service", "serve_index": "server", "BackgroundServer": "server", "MicroBatcher": "batching"}

__all__ = ["SearchIndex", "MilvusIndex", "open_index", "create_index", "Neighbours", "IvfParameters",
           "choose_ivf_parameters", "binary_codes", "build_index", "add_to_index", "remove_from_index", "compact_index",
           "search_images", "load_model_for", "match_thresholds", "find_duplicates", "write_duplicates", "create_app",
           "serve_index", "BackgroundServer", "MicroBatcher"]


def __getattr__(name):
    if name in _SERVICE:
        value = getattr(import_module(f".{_SERVICE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

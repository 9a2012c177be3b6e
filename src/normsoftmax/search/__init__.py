"""Putting embeddings to work: faiss indexes in a folder (:mod:`.index`), the ``index`` commands
(:mod:`.command`), and a search service with a page (:mod:`.service`, :mod:`.batching`, :mod:`.uploads`,
:mod:`.thumbnails`, ``page.html``) run by :mod:`.server`.

The service modules import FastAPI; they load only when used, so ``normsoftmax index ...`` does not pay for them.
"""

from importlib import import_module

from .command import add_to_index, build_index, load_model_for, search_images
from .index import (
    IvfParameters,
    Neighbours,
    SearchIndex,
    binary_codes,
    choose_ivf_parameters,
)

_SERVICE = {"create_app": "service", "serve_index": "server", "BackgroundServer": "server", "MicroBatcher": "batching"}

__all__ = ["SearchIndex", "Neighbours", "IvfParameters", "choose_ivf_parameters", "binary_codes", "build_index",
           "add_to_index", "search_images", "load_model_for", "create_app", "serve_index", "BackgroundServer",
           "MicroBatcher"]


def __getattr__(name):
    if name in _SERVICE:
        value = getattr(import_module(f".{_SERVICE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

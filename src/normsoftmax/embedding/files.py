"""Embeddings on disk: one ``.npz`` format for the embeddings of a split (leave-one-out) or of a query and a
gallery set, with the images' paths beside them."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..files import atomic_output
from .arrays import check_embeddings_arrays

_LOO_KEYS = ("embeddings", "labels")
_QG_KEYS = ("query_embeddings", "query_labels", "gallery_embeddings", "gallery_labels")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy()
    return np.asarray(x)


def save_embeddings_npz(path, *, embeddings=None, labels=None, query_embeddings=None, query_labels=None,
                        gallery_embeddings=None, gallery_labels=None, paths=None, query_paths=None,
                        gallery_paths=None) -> None:
    """Write embeddings (leave-one-out or query-gallery) and optional image paths to ``path``."""
    mode, xq, yq, xg, yg = check_embeddings_arrays(embeddings, labels, query_embeddings, query_labels,
                                           gallery_embeddings, gallery_labels)
    arrays: dict[str, np.ndarray] = {}
    if mode == "leave-one-out":
        if query_paths is not None or gallery_paths is not None:
            raise ValueError("query_paths/gallery_paths belong to query-gallery files; use paths")
        arrays["embeddings"], arrays["labels"] = _to_numpy(xq), yq
        named = {"paths": (paths, len(yq))}
    else:
        if paths is not None:
            raise ValueError("paths belongs to leave-one-out files; use query_paths and gallery_paths")
        arrays.update(query_embeddings=_to_numpy(xq), query_labels=yq,
                      gallery_embeddings=_to_numpy(xg), gallery_labels=yg)
        named = {"query_paths": (query_paths, len(yq)), "gallery_paths": (gallery_paths, len(yg))}
    for key, (value, n) in named.items():
        if value is not None:
            value = np.asarray([str(p) for p in value], dtype=str)
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries but there are {n} embeddings")
            arrays[key] = value
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def load_embeddings_npz(path) -> dict:
    """Read a file written by :func:`save_embeddings_npz`.

    Returns the keyword arguments for :func:`evaluate_embeddings` (``embeddings`` and
    ``labels``, or the four ``query_*``/``gallery_*`` arrays), plus ``"paths"`` when the
    file has image paths: a list of str (leave-one-out) or ``{"query": [...],
    "gallery": [...]}`` (query-gallery). Missing or inconsistent contents raise a
    ``ValueError`` naming the file.
    """
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exc:
        raise ValueError(f"{name}: not a readable .npz file ({exc})") from exc
    has_loo = any(k in arrays for k in _LOO_KEYS)
    has_qg = any(k in arrays for k in _QG_KEYS)
    if has_loo and has_qg:
        raise ValueError(f"{name}: has both leave-one-out keys {_LOO_KEYS} and query-gallery keys {_QG_KEYS}")
    if not has_loo and not has_qg:
        raise ValueError(f"{name}: no embeddings; expected keys {_LOO_KEYS} or {_QG_KEYS}, found {sorted(arrays)}")
    keys = _LOO_KEYS if has_loo else _QG_KEYS
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{name}: missing key(s) {', '.join(missing)}")
    out: dict[str, Any] = {k: arrays[k] for k in keys}
    try:
        check_embeddings_arrays(**{k: out.get(k) for k in _LOO_KEYS + _QG_KEYS})
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    path_keys = ("paths",) if has_loo else ("query_paths", "gallery_paths")
    stray = [k for k in ("paths", "query_paths", "gallery_paths") if k in arrays and k not in path_keys]
    if stray:
        raise ValueError(f"{name}: key(s) {', '.join(stray)} do not belong to a {'leave-one-out' if has_loo else 'query-gallery'} file")
    lengths = {"paths": len(out.get("labels", ())), "query_paths": len(out.get("query_labels", ())),
               "gallery_paths": len(out.get("gallery_labels", ()))}
    found = {}
    for k in path_keys:
        if k in arrays:
            if arrays[k].ndim != 1 or len(arrays[k]) != lengths[k]:
                raise ValueError(f"{name}: {k} has {len(arrays[k])} entries but there are {lengths[k]} embeddings")
            found[k] = [str(p) for p in arrays[k]]
    if has_loo and "paths" in found:
        out["paths"] = found["paths"]
    elif has_qg and found:
        out["paths"] = {"query": found.get("query_paths"), "gallery": found.get("gallery_paths")}
    return out


__all__ = ["save_embeddings_npz", "load_embeddings_npz"]

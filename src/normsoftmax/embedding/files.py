"""Embeddings on disk: one ``.npz`` format.

* ``embeddings`` (N x D float32) and ``paths`` (N strings), with ``labels`` (N integers) where known and
  ``metadata`` (a JSON string: the model's checkpoint and digest, the source, ...) -- what
  ``normsoftmax embed`` writes and ``normsoftmax index build`` reads (:func:`write_embeddings`,
  :func:`read_embeddings`);
* for evaluation, ``embeddings`` + ``labels`` (leave-one-out) or ``query_*`` / ``gallery_*`` arrays, with
  optional paths (:func:`save_embeddings_npz`, :func:`load_embeddings_npz`).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..files import atomic_output
from .arrays import check_embeddings_arrays

_LOO_KEYS = ("embeddings", "labels")
_QG_KEYS = ("query_embeddings", "query_labels", "gallery_embeddings", "gallery_labels")


def _read_npz(name: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles); a file that is not one is a ValueError naming it."""
    try:
        with np.load(name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{name}: not a readable .npz file ({exc})") from exc


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
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


def load_embeddings_npz(path) -> dict:
    """Read a file written by :func:`save_embeddings_npz`.

    Returns the keyword arguments for :func:`evaluate_embeddings` (``embeddings`` and
    ``labels``, or the four ``query_*``/``gallery_*`` arrays), plus ``"paths"`` when the
    file has image paths: a list of str (leave-one-out) or ``{"query": [...],
    "gallery": [...]}`` (query-gallery). Missing or inconsistent contents raise a
    ``ValueError`` naming the file.
    """
    name = os.fspath(path)
    arrays = _read_npz(name)
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
        raise ValueError(f"{name}: key(s) {', '.join(stray)} do not belong to a "
                         f"{'leave-one-out' if has_loo else 'query-gallery'} file")
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


@dataclass
class EmbeddingsFile:
    """The content of an embeddings file: vectors, their images' paths, labels where known, metadata."""

    embeddings: np.ndarray  # (N, D) float32
    paths: list[str]
    labels: np.ndarray | None = None  # (N,) int64
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def write_embeddings(path, embeddings, paths, labels=None, metadata: dict | None = None) -> None:
    """Write an embeddings file atomically (a crash leaves the previous file, never half of a new one)."""
    embeddings = np.ascontiguousarray(_to_numpy(embeddings), dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be N x D, got shape {embeddings.shape}")
    if len(paths) != len(embeddings):
        raise ValueError(f"{len(paths)} paths for {len(embeddings)} embeddings")
    arrays = {"embeddings": embeddings, "paths": np.asarray([str(p) for p in paths], dtype=str).reshape(-1),
              "metadata": np.asarray(json.dumps(metadata or {}, sort_keys=True))}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(embeddings),):
            raise ValueError(f"labels must be {len(embeddings)} integers, got shape {labels.shape}")
        arrays["labels"] = labels
    with atomic_output(path, durable=True) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def read_embeddings(path) -> EmbeddingsFile:
    """Read an embeddings file (``normsoftmax embed``'s, or an evaluation file of one split with paths)."""
    name = os.fspath(path)
    arrays = _read_npz(name)
    if "embeddings" not in arrays or "paths" not in arrays:
        raise ValueError(f"{name}: an embeddings file holds 'embeddings' and 'paths'; found {sorted(arrays)}")
    embeddings, paths = arrays["embeddings"], [str(p) for p in arrays["paths"].reshape(-1)]
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f" or len(paths) != len(embeddings):
        raise ValueError(f"{name}: expected N x D float embeddings and N paths, found {embeddings.shape} "
                         f"{embeddings.dtype} and {len(paths)} paths")
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{name}: embeddings contain NaN or infinite values")
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (len(paths),):
        raise ValueError(f"{name}: labels has {labels.size} entries but there are {len(paths)} embeddings")
    try:
        metadata = json.loads(str(arrays["metadata"])) if "metadata" in arrays else {}
    except ValueError:
        raise ValueError(f"{name}: its metadata is not valid JSON") from None
    return EmbeddingsFile(embeddings.astype(np.float32, copy=False), paths,
                          None if labels is None else labels.astype(np.int64), metadata)


__all__ = ["save_embeddings_npz", "load_embeddings_npz", "write_embeddings", "read_embeddings", "EmbeddingsFile"]

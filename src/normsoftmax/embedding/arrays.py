"""Checking embedding arrays: shapes, dtypes, finite values, and the two layouts (leave-one-out, or query and
gallery). Everything that accepts embeddings -- evaluation, files, indexes -- checks them here."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype object")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, copy=True, order="C")
    try:
        return torch.from_numpy(arr)
    except TypeError as exc:
        raise ValueError(f"{name}: unsupported dtype {arr.dtype}") from exc


def _check_embeddings(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N x D), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point array, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    lo, hi = torch.aminmax(t)  # NaN propagates; one pass, no temporary
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_labels(y: Any, name: str, n: int) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but there are {n} embeddings")
    return arr.astype(np.int64, copy=False)


def check_embeddings_arrays(embeddings, labels, query_embeddings, query_labels, gallery_embeddings, gallery_labels):
    loo = (embeddings, labels)
    qg = (query_embeddings, query_labels, gallery_embeddings, gallery_labels)
    has_loo = any(v is not None for v in loo)
    has_qg = any(v is not None for v in qg)
    if has_loo and has_qg:
        raise ValueError("give either embeddings+labels (leave-one-out) or the four query_*/gallery_* arrays, not both")
    if has_loo:
        if embeddings is None or labels is None:
            raise ValueError("leave-one-out evaluation needs both embeddings and labels")
        x = _check_embeddings(embeddings, "embeddings")
        y = _check_labels(labels, "labels", x.shape[0])
        return "leave-one-out", x, y, None, None
    if has_qg:
        names = ("query_embeddings", "query_labels", "gallery_embeddings", "gallery_labels")
        missing = [name for name, value in zip(names, qg, strict=True) if value is None]
        if missing:
            raise ValueError(f"query-gallery evaluation needs all four arrays; missing: {', '.join(missing)}")
        xq = _check_embeddings(query_embeddings, "query_embeddings")
        yq = _check_labels(query_labels, "query_labels", xq.shape[0])
        xg = _check_embeddings(gallery_embeddings, "gallery_embeddings")
        yg = _check_labels(gallery_labels, "gallery_labels", xg.shape[0])
        if xq.shape[1] != xg.shape[1]:
            raise ValueError(f"query and gallery embeddings differ in dimension: {xq.shape[1]} vs {xg.shape[1]}")
        return "query-gallery", xq, yq, xg, yg
    raise ValueError("no embeddings given: pass embeddings+labels or query_*/gallery_* arrays")

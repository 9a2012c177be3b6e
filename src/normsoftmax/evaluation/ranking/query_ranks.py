"""From ranks to metrics: per query the first correct match's rank, AP@R and R-precision, then
Recall@K, MAP@R and R-precision over the queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class QueryRanks:
    """Per query: R, the rank of its first correct match, average precision at R, R-precision.

    ``first[q]`` is the 0-based rank of the first correct match when below the recall cap, else ``-1`` (no
    correct match, or none within the cap); ``ap`` and ``rp`` are fractions (0 for queries without a
    correct match).
    """

    count: np.ndarray  # (nq,) int64
    first: np.ndarray  # (nq,) int64
    ap: np.ndarray  # (nq,) float64
    rp: np.ndarray  # (nq,) float64


def per_query_ranks(before: torch.Tensor, active: torch.Tensor, count: torch.Tensor):
    """Per query: rank of the first correct match, average precision at R, R-precision.

    The first rank is exact when below the recall cap and ``-1`` when the query has no correct match or
    its first one ranks at or beyond the cap; AP and R-precision are fractions (0 for queries without a
    correct match).
    """
    nq = int(count.shape[0])
    max_r = before.shape[1]
    has = count > 0
    if max_r == 0:
        zero = torch.zeros(nq, dtype=torch.float64, device=count.device)
        return torch.full((nq,), -1, dtype=torch.int64, device=count.device), zero, zero.clone()
    first = torch.where(has & (active > 0), before[:, 0], -1)
    m = torch.arange(max_r, device=count.device)[None, :]
    position = m + before  # 0-based rank of the m-th positive (valid where m < active)
    relevant = (m < active[:, None]) & (position < count[:, None])
    r = count.clamp_min(1).to(torch.float64)
    ap = torch.where(relevant, (m + 1).to(torch.float64) / (position + 1).to(torch.float64), 0.0).sum(1) / r
    rp = relevant.sum(1).to(torch.float64) / r
    return first, ap, rp


def metrics_from_ranks(ranks: QueryRanks, ks) -> dict:
    """Recall@K (percent of all queries), MAP@R and R-precision (percent, over queries with R > 0)."""
    nq = len(ranks.count)
    out: dict[str, float | None] = {}
    found = ranks.first >= 0
    for k in ks:
        out[f"recall@{k}"] = 100.0 * int((found & (ranks.first < k)).sum()) / nq if nq else 0.0
    has = ranks.count > 0
    n_has = int(has.sum())
    if n_has == 0:
        out["map@r"] = None
        out["r_precision"] = None
    else:
        out["map@r"] = 100.0 * float(ranks.ap[has].sum()) / n_has
        out["r_precision"] = 100.0 * float(ranks.rp[has].sum()) / n_has
    return out

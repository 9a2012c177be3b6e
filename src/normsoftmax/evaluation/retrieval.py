"""Exact, blocked ranking of the correct matches of every query.

Retrieval metrics only need, for every query, the rank of some of its correct
matches: Recall@K the rank of the first one, MAP@R and R-precision the ranks of
the correct matches that land in the top R (R = number of correct matches of
the query in the gallery). The rank of a correct match is the number of
incorrect gallery items ranked before it plus the number of correct ones
ranked before it, so everything follows from one number per (query, correct
match): how many *negatives* rank before it. This module counts those numbers
exactly, without sorting and without ever holding a query-by-gallery matrix.

Ranking
    Gallery items are ordered by score (higher first); equal scores are
    ordered by gallery index (lower first). Every gallery item therefore has a
    unique *key* (score, -index) and "j ranks before p" means key(j) > key(p).

Algorithm
    1. The correct matches of each query ("positives") are known from the
       labels. Their exact scores are computed directly (float64 for float
       embeddings, integers for binary codes) and sorted by key; these are the
       per-query thresholds.
    2. Similarity tiles of ``block_size`` queries x ``block_size`` gallery items
       are computed with a matrix product. In leave-one-out evaluation the
       similarity matrix is symmetric, so only tiles with block(I) <= block(J)
       are computed and each is used for both its rows and its columns. Pairs
       with equal labels (and the query itself) are masked out of the tile, so
       everything left is a negative.
    3. Per query the engine keeps, for each threshold, the number of negatives
       seen so far that *surely* rank before that positive, and a *floor*: the
       lowest tile value that could still matter. The gallery side of a tile is
       cut into bands of 256 items; only (query, band) segments whose maximum
       reaches the query's floor are looked at. In those, elements above the
       best positive's threshold are just counted (dense compare and sum), and
       the few elements between the floor and that threshold become sparse
       candidates, classified against the thresholds of their query by binary
       search (thresholds are sorted): O(log R) per candidate.
    4. Counts are capped: Recall@K needs the count of the best positive only
       while it is below max(ks), MAP@R needs the count of the m-th positive
       (0-based) only while it is below R - m. Once a count reaches its cap the
       threshold is retired for good (counts only grow), which raises the
       floor; a query whose thresholds are all retired costs nothing more, and a
       tile whose queries (rows and columns) are all retired is not computed.
       Retired thresholds are exactly the ones whose positive lies outside the
       top max(ks) (first positive) or outside the top R (the others), so no
       metric changes.

Exactness
    Binary codes: the tile is an exact integer product of +-1 codes (int8
    matmul with int32 accumulation on the CPU, float32 on other devices:
    integers below 2**24 are exact), equal to D - 2 * Hamming distance. Keys
    (score, -index) are compared as exact int64 numbers, so binary results are
    exact, ties included.

    Float embeddings: the tile is computed in low precision (bfloat16 inputs
    with float32 accumulation and a bfloat16 result on CPUs that support it;
    float32 on inputs rounded to the TF32 grid elsewhere). For every query q
    and gallery item g a rigorous bound holds::

        |s(q, g) - tile(q, g)| <= eps_q + eps_max + 3 eps_q eps_max + acc
                                  + rho * |tile(q, g)|

    where eps_x = ||x_hat - round(x_hat)||_2 is measured per vector (x_hat is
    the float64 unit vector), eps_max is its maximum over the gallery,
    acc = 2 D 2**-24 (1 + eps_q)(1 + eps_max) bounds float32 accumulation and
    rho bounds the rounding of the result. A tile value is therefore either
    surely above a threshold, surely below it, or *ambiguous*; ambiguous
    candidates (a thin band around each threshold) are stored and, at the end,
    re-scored exactly in float64 and compared by key, but only for thresholds
    that are still needed.

Ties (float)
    A tie is an exact tie of cosines. The exact score of a pair is the signed
    squared cosine d |d| / (|q|^2 |g|^2) in float64 (``FloatScorer.exact_scores``):
    the dot product d and the squared norms are float64 sums of products, then
    one multiplication and one division, each correctly rounded -- no square
    root, because torch's float64 sqrt on the CPU goes through MKL's vector
    math, whose last bit differs between instruction sets (AVX-512 and AVX2
    machines ranked (1,1,0)-like ties differently). Where those sums are exact
    (integer-valued embeddings and any others whose products and sums need no
    rounding) the scores are exact rationals correctly rounded, so equal cosines
    always tie bit for bit (ties go to the lower gallery index) and unequal ones
    keep their order unless they differ by less than a float64 ulp (impossible
    for small integers), on every CPU. Otherwise the float64 sums carry rounding
    (their order may depend on the CPU's vector width), which can only reorder
    pairs whose cosines differ by a few float64 ulps (~1e-16). The test suite
    holds the evaluator to an exact rational reference.

    On CUDA the float32 matmul precision is held at "high" (TF32) during tile
    products: TF32 is exact on the TF32-grid inputs, bfloat16 ("medium") would
    not be.

Memory and speed
    Working memory is O(block_size**2) for a tile plus O(queries x max R) for
    the counters and the positive pairs (so classes of thousands of images
    cost memory quadratic in the class size), plus the low-precision copy of
    the embeddings (bfloat16: half of float32; binary: int8). At SOP scale
    (60,502 x 2048) the evaluation needs about 0.6 GB besides the embeddings.
    Exact re-scoring gathers only ambiguous pairs, in chunks. The matrix
    products dominate the time and use all intra-op threads; the bookkeeping
    between them (many small operations) runs on one thread, which is faster
    than synchronising threads for small work and robust when other processes
    share the cores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Positives",
    "build_positive_pairs",
    "FloatScorer",
    "cosine_from_score",
    "BinaryScorer",
    "rank_positives",
    "metrics_from_ranks",
    "per_query_ranks",
    "default_block_size",
]

_INT32_MIN = torch.iinfo(torch.int32).min
_INT32_MAX = torch.iinfo(torch.int32).max
_INT64_MIN = torch.iinfo(torch.int64).min
# Elements of (candidates x max R) handled at once in the sparse stages.
_CHUNK_ELEMENTS = 1 << 22
# Rows gathered at once for exact float64 re-scoring.
_RESCORE_ROWS = 128
# Gallery items per band in a tile scan (see _scan).
_BAND = 256


def default_block_size(device: torch.device) -> int:
    """Rows per tile: 2048 on the CPU (bf16 tile of 8 MB), 8192 on accelerators."""
    return 2048 if device.type == "cpu" else 8192


def _bf16_matmul_is_fast(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the build
        return False


# --------------------------------------------------------------------------- positives


def build_positive_pairs(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool):
    """All (query, gallery) pairs with equal labels, as two int64 arrays.

    Pairs are grouped by query (ascending) and, within a query, by gallery index
    (ascending). With ``exclude_self`` (leave-one-out: queries are the gallery)
    the pair (i, i) is left out.
    """
    query_labels = np.asarray(query_labels)
    uniq, g_ids = np.unique(np.asarray(gallery_labels), return_inverse=True)
    if len(uniq) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    order = np.argsort(g_ids.reshape(-1), kind="stable")  # gallery indices grouped by label
    g_counts = np.bincount(g_ids.reshape(-1), minlength=len(uniq))
    g_start = np.cumsum(g_counts) - g_counts
    slot = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
    found = uniq[slot] == query_labels
    cnt = np.where(found, g_counts[slot], 0).astype(np.int64)
    start = np.where(found, g_start[slot], 0).astype(np.int64)
    pq = np.repeat(np.arange(len(query_labels), dtype=np.int64), cnt)
    offset = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    pg = order[np.repeat(start, cnt) + offset].astype(np.int64)
    if exclude_self:
        keep = pq != pg
        pq, pg = pq[keep], pg[keep]
    return pq, pg


@dataclass
class Positives:
    """Positives of every query, best-ranked first, padded to ``max_r`` columns.

    ``count[q]`` = R of query q; ``index[q, m]`` / ``score[q, m]`` = gallery index
    and exact score (the scorer's ``exact_scores``) of its m-th ranked positive
    (``-1`` / minimum value as padding).
    """

    count: torch.Tensor  # (nq,) int64
    index: torch.Tensor  # (nq, max_r) int64
    score: torch.Tensor  # (nq, max_r) float64 or int64
    pair_query: torch.Tensor  # (P,) int64, every positive pair
    pair_gallery: torch.Tensor  # (P,) int64

    @property
    def max_r(self) -> int:
        return int(self.index.shape[1])

    @classmethod
    def build(cls, pair_query, pair_gallery, score, num_queries: int, device) -> "Positives":
        pq = np.asarray(pair_query, dtype=np.int64)
        pg = np.asarray(pair_gallery, dtype=np.int64)
        sc = np.asarray(score)
        # rank order: query, then score descending, then gallery index ascending
        order = np.lexsort((pg, -sc, pq))
        pq, pg, sc = pq[order], pg[order], sc[order]
        counts = np.bincount(pq, minlength=num_queries).astype(np.int64)
        max_r = int(counts.max()) if num_queries and len(pq) else 0
        ptr = np.concatenate([[0], np.cumsum(counts)])
        slot = np.arange(len(pq), dtype=np.int64) - ptr[pq]
        index = np.full((num_queries, max_r), -1, dtype=np.int64)
        index[pq, slot] = pg
        if sc.dtype.kind == "f":
            table = np.full((num_queries, max_r), -np.inf, dtype=np.float64)
        else:
            table = np.full((num_queries, max_r), np.iinfo(np.int64).min, dtype=np.int64)
        table[pq, slot] = sc
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return cls(as_t(counts), as_t(index), as_t(table), as_t(pq), as_t(pg))


def _ordered_int(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (``<``, ``==``) as the floats (no NaN)."""
    x = x.to(torch.float32) + 0.0  # -0.0 -> +0.0: they compare equal
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def _row_keys(desc: torch.Tensor, span: int) -> tuple[torch.Tensor, int]:
    """Flatten per-row non-increasing int64 keys in ``[-span, span]`` into one ascending sequence.

    Row q becomes ``q * stride + span - key``, so a per-row ``searchsorted`` is one global
    ``torch.searchsorted`` with the candidate's value mapped the same way (``_row_query``).
    """
    stride = 2 * span + 2
    rows = torch.arange(desc.shape[0], device=desc.device, dtype=torch.int64)[:, None]
    return (rows * stride + (span - desc)).reshape(-1), stride


def _row_count(flat: torch.Tensor, stride: int, width: int, span: int, q: torch.Tensor,
               key: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per candidate: number of entries of row q (non-increasing keys) ``>= key`` (``> key`` if strict)."""
    v = q * stride + (span - key)
    return torch.searchsorted(flat, v, right=not strict) - q * width


# --------------------------------------------------------------------------- scorers


def _round_to_tf32_grid(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to 11 significant bits (TF32), to nearest."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0x1000) & ~0x1FFF
    return bits.view(torch.float32)


def cosine_from_score(score: torch.Tensor) -> torch.Tensor:
    """Cosine similarity from a float exact score, to within a few float64 ulps (thresholds, not ranking)."""
    return score.sign() * score.abs().sqrt()


class FloatScorer:
    """Cosine similarity: low-precision tiles, exact float64 re-scoring."""

    kind = "float"

    def __init__(self, xq: torch.Tensor, xg: torch.Tensor | None, device: torch.device, low_precision=None):
        """``xg=None`` means the gallery is the query set (leave-one-out)."""
        self.device = device
        if low_precision is None:
            low_precision = "bf16" if _bf16_matmul_is_fast(device) else "tf32"
        self.low_precision = low_precision
        self._unit_roundoff = 2.0**-24  # of the float32 accumulation in bf16 and tf32 tiles
        if low_precision == "bf16":
            self.tile_dtype = torch.bfloat16
            self._rho = 2.0**-8 / (1 - 2.0**-8)  # relative rounding of the bf16 result
        elif low_precision == "tf32":
            self.tile_dtype = torch.float32
            self._rho = 2.0**-23  # float32 result: rounding covered by the accumulation bound
        elif low_precision == "fp64":
            # For embeddings whose similarities crowd within the low-precision error band (an untrained
            # network): float64 tiles leave almost no pair ambiguous, where bf16 would leave nearly all.
            self.tile_dtype = torch.float64
            self._rho = 2.0**-53
            self._unit_roundoff = 2.0**-53
        else:
            raise ValueError(f"unknown low_precision {low_precision!r}")
        self.dim = int(xq.shape[1])
        self.xq = xq
        self.xg = xq if xg is None else xg
        self.q_codes, self.q_squared, self.q_eps = self._prepare(xq)
        if xg is None:
            self.g_codes, self.g_squared, self.g_eps = self.q_codes, self.q_squared, self.q_eps
        else:
            self.g_codes, self.g_squared, self.g_eps = self._prepare(xg)
        self.masked_value = float("-inf")
        self.inactive_floor = torch.tensor(float("inf"), dtype=self.tile_dtype, device=device)

    def _prepare(self, x: torch.Tensor):
        n = x.shape[0]
        codes = torch.empty((n, self.dim), dtype=self.tile_dtype, device=self.device)
        squared_norms = torch.empty(n, dtype=torch.float64, device=self.device)
        eps = torch.empty(n, dtype=torch.float64, device=self.device)
        step = 4096
        for s in range(0, n, step):
            x64 = x[s : s + step].to(torch.float64)
            squared = (x64 * x64).sum(1)
            # torch's float64 sqrt is not correctly rounded on every CPU (MKL's vector math differs by ISA);
            # the unit vectors only feed the low-precision tiles, whose error bound absorbs a few ulps.
            unit = x64 / squared.sqrt().clamp_min_(1e-150)[:, None]
            low = unit.to(torch.float32)
            if self.low_precision == "bf16":
                low = low.to(torch.bfloat16)
            elif self.low_precision == "fp64":
                low = unit
            else:
                low = _round_to_tf32_grid(low)
            codes[s : s + step] = low
            eps[s : s + step] = (unit - low.to(torch.float64)).norm(dim=1)
            squared_norms[s : s + step] = squared
        return codes, squared_norms, eps

    def tile(self, qs: slice, gs: slice) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.q_codes[qs] @ self.g_codes[gs].T
        # TF32 is exact on TF32-grid inputs; lower settings ("medium": bf16) are not
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if previous == "medium" else previous)
        try:
            return self.q_codes[qs] @ self.g_codes[gs].T
        finally:
            torch.set_float32_matmul_precision(previous)

    def exact_scores(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        """The exact ranking score of the given pairs: the signed squared cosine ``d |d| / (|q|^2 |g|^2)``.

        ``d`` and the squared norms are float64 sums of products, and the score takes one float64
        multiplication and one division, each correctly rounded: no square root, whose float64 result
        differs between CPUs (MKL's vector math). The score is monotone in the cosine, so it ranks exactly
        as the cosine does; where the sums are exact (integer-valued embeddings, e.g.), mathematically equal
        cosines get bitwise equal scores ((1, 1, 0) and (2, 2, 0) tie) and different ones are never
        swapped, on every CPU. Pairs are processed in chunks of exactly ``_RESCORE_ROWS`` rows (the last
        one padded), so every pair goes through the same arithmetic whatever the batch: identical vectors
        always get bitwise identical scores (e.g. a negative that duplicates a positive).
        """
        with _num_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):
            return self._exact_scores(qi, gi)

    def _exact_scores(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        n = len(qi)
        out = torch.empty(n, dtype=torch.float64, device=self.device)
        c = _RESCORE_ROWS
        a_in = torch.empty((c, self.dim), dtype=self.xq.dtype, device=self.device)
        b_in = torch.empty((c, self.dim), dtype=self.xg.dtype, device=self.device)
        a = torch.empty((c, self.dim), dtype=torch.float64, device=self.device)
        b = torch.empty_like(a)
        for s in range(0, n, c):
            q, g = qi[s : s + c], gi[s : s + c]
            k = len(q)
            if k < c:
                q = torch.cat([q, q.new_zeros(c - k)])
                g = torch.cat([g, g.new_zeros(c - k)])
            torch.index_select(self.xq, 0, q, out=a_in)
            torch.index_select(self.xg, 0, g, out=b_in)
            a.copy_(a_in)
            b.copy_(b_in)
            dots = a.mul_(b).sum(1)
            denominator = self.q_squared[q] * self.g_squared[g]
            score = torch.where(denominator > 0, dots * dots.abs() / denominator, 0.0)
            out[s : s + k] = score[:k]
        return out

    def set_positives(self, pos: Positives) -> None:
        self.pos = pos
        eps_g = float(self.g_eps.max()) if self.g_eps.numel() else 0.0
        eps_q = self.q_eps
        acc = 2.0 * self.dim * self._unit_roundoff * (1 + eps_q) * (1 + eps_g)
        delta = (eps_q + eps_g + 3 * eps_q * eps_g + acc + 1e-9)[:, None]  # (nq, 1)
        t = cosine_from_score(pos.score)  # (nq, R) float64, -inf padding
        rho = self._rho
        up = t + delta
        up = torch.where(up >= 0, up / (1 - rho), up / (1 + rho)) + 1e-6
        low = t - delta
        low = torch.where(low >= 0, low / (1 + rho), low / (1 - rho)) - 1e-6
        valid = torch.arange(pos.max_r, device=self.device)[None, :] < pos.count[:, None]
        neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=self.device)
        # m-th threshold: a tile value > thr_up[q, m] surely ranks before positive m,
        # a tile value < thr_low[q, m] surely ranks after it (conservative after rounding).
        self.thr_up = torch.where(valid, up, neg_inf).to(torch.float32)
        self.thr_low = torch.where(valid, low, neg_inf).to(torch.float32)
        # rows are non-increasing (monotone maps of sorted scores): classify by binary search
        self._span = 1 << 32
        self._flat_up, self._stride = _row_keys(_ordered_int(self.thr_up), self._span)
        self._flat_low, _ = _row_keys(_ordered_int(self.thr_low), self._span)
        floor = self.thr_low.to(self.tile_dtype)
        too_high = floor.to(torch.float32) > self.thr_low
        floor = torch.where(too_high, torch.nextafter(floor, torch.full_like(floor, float("-inf"))), floor)
        self.floor_table = floor
        # a tile value > top[q] surely ranks before every positive of q
        top32 = torch.where(pos.count > 0, self.thr_up[:, 0], float("inf")) if pos.max_r else \
            torch.full((len(pos.count),), float("inf"), device=self.device)
        top = top32.to(self.tile_dtype)
        too_low = top.to(torch.float32) < top32
        self.top = torch.where(too_low, torch.nextafter(top, torch.full_like(top, float("inf"))), top)

    def classify(self, q: torch.Tensor, g: torch.Tensor, val: torch.Tensor):
        """m0 = number of thresholds not surely passed; m1 = number surely not passed.

        Threshold rows are non-increasing, so both are a binary search in the query's row:
        O(log R) per candidate instead of O(max R).
        """
        key = _ordered_int(val)
        w = self.pos.max_r
        m0 = _row_count(self._flat_up, self._stride, w, self._span, q, key, strict=False)
        m1 = _row_count(self._flat_low, self._stride, w, self._span, q, key, strict=True)
        return m0, m1

    def resolve(self, q, g, m1, m0):
        """First threshold index in [m1, m0] that the exact key passes, per candidate.

        Positives are sorted by key, so "the candidate does not rank before positive m"
        holds on a prefix of each row: binary search inside [m1, m0).
        """
        order = torch.argsort(q * self.g_codes.shape[0] + g)  # query rows stay in cache
        exact = torch.empty(len(q), dtype=torch.float64, device=self.device)
        exact[order] = self.exact_scores(q[order], g[order])
        w = self.pos.max_r
        score, index = self.pos.score.reshape(-1), self.pos.index.reshape(-1)
        base = q * w
        lo, hi = m1.clone(), m0.clone()
        while True:
            open_ = lo < hi
            if not bool(open_.any()):
                break
            mid = torch.where(open_, (lo + hi) // 2, 0)
            ts, tp = score[base + mid], index[base + mid]
            above = (exact > ts) | ((exact == ts) & (g < tp))
            lo = torch.where(open_ & ~above, mid + 1, lo)
            hi = torch.where(open_ & above, mid, hi)
        return lo


class BinaryScorer:
    """Hamming ranking of sign bits, as exact integer dot products of +-1 codes."""

    kind = "binary"

    def __init__(self, xq: torch.Tensor, xg: torch.Tensor | None, device: torch.device):
        self.device = device
        self.dim = int(xq.shape[1])
        # int8 matmul (exact int32 accumulation) on the CPU; float32 +-1 products elsewhere.
        self.tile_dtype = torch.int32 if device.type == "cpu" else torch.float32
        code_dtype = torch.int8 if device.type == "cpu" else torch.float32
        self.q_codes = self._codes(xq, code_dtype)
        self.g_codes = self.q_codes if xg is None else self._codes(xg, code_dtype)
        self.num_gallery = int(self.g_codes.shape[0])
        if self.tile_dtype == torch.int32:
            self.masked_value = _INT32_MIN
            self.inactive_floor = torch.tensor(_INT32_MAX, dtype=torch.int32, device=device)
        else:
            self.masked_value = float("-inf")
            self.inactive_floor = torch.tensor(float("inf"), dtype=torch.float32, device=device)

    def _codes(self, x: torch.Tensor, dtype) -> torch.Tensor:
        codes = torch.empty(x.shape, dtype=dtype, device=self.device)
        step = 8192
        for s in range(0, x.shape[0], step):
            codes[s : s + step] = ((x[s : s + step] > 0).to(torch.int8) * 2 - 1).to(dtype)
        return codes

    def tile(self, qs: slice, gs: slice) -> torch.Tensor:
        if self.tile_dtype == torch.int32:
            return torch._int_mm(self.q_codes[qs], self.g_codes[gs].T)
        return self.q_codes[qs] @ self.g_codes[gs].T

    def exact_scores(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(qi), dtype=torch.int64, device=self.device)
        step = 1024
        with _num_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):
            for s in range(0, len(qi), step):
                a = self.q_codes.index_select(0, qi[s : s + step])
                b = self.g_codes.index_select(0, gi[s : s + step])
                out[s : s + step] = a.mul_(b).sum(1, dtype=torch.int64)
        return out

    def _key(self, score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # larger key ranks first: higher score, then lower gallery index
        n = self.num_gallery
        return score.to(torch.int64) * n + (n - 1 - index)

    def set_positives(self, pos: Positives) -> None:
        self.pos = pos
        valid = torch.arange(pos.max_r, device=self.device)[None, :] < pos.count[:, None]
        key = self._key(torch.where(valid, pos.score, 0), pos.index)
        self.thr_key = torch.where(valid, key, torch.full_like(key, _INT64_MIN))
        # keys are strictly decreasing along a row and lie in [-span, span]; padding -> -span
        self._span = (self.dim + 2) * max(1, self.num_gallery)
        self._flat_key, self._stride = _row_keys(torch.where(valid, key, -self._span), self._span)
        self.floor_table = torch.where(valid, pos.score, 0).to(self.tile_dtype)
        # a tile value > top[q] (the best positive's score) surely ranks before every positive of q
        if pos.max_r:
            self.top = torch.where(pos.count > 0, pos.score[:, 0], self.dim + 1).to(self.tile_dtype)
        else:
            self.top = torch.full((len(pos.count),), self.dim + 1, dtype=self.tile_dtype, device=self.device)

    def classify(self, q, g, val):
        key = self._key(val, g)
        m0 = _row_count(self._flat_key, self._stride, self.pos.max_r, self._span, q, key, strict=False)
        return m0, m0

    def resolve(self, q, g, m1, m0):  # pragma: no cover - binary keys are never ambiguous
        raise AssertionError("binary ranking has no ambiguous candidates")


# --------------------------------------------------------------------------- engine


@contextmanager
def _num_threads(n: int):
    """Run torch ops with ``n`` intra-op threads (CPU), then restore."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _scan(tile: torch.Tensor, floor: torch.Tensor, top: torch.Tensor, queries_on_rows: bool):
    """Scan a tile for one direction: queries on its rows, or on its columns.

    The gallery side is cut into bands of ``_BAND`` items; only the (query, band)
    segments whose maximum reaches the query's floor are looked at. Returns ``None``
    or ``(q, above, cand_q, cand_g, cand_val)`` with local indices: ``above[i]`` is
    the number of elements ``> top`` in a segment of query ``q[i]`` (they surely rank
    before every positive of that query), and the candidates are the elements in
    ``[floor, top]`` (``top >= floor`` always holds).
    """
    n_gal = tile.shape[1] if queries_on_rows else tile.shape[0]
    n_full = n_gal // _BAND * _BAND
    bands = [(g0, min(n_gal, g0 + _BAND)) for g0 in range(0, n_gal, _BAND)]
    if queries_on_rows:
        band_max = [tile[:, :n_full].unflatten(1, (-1, _BAND)).amax(2)] if n_full else []
        if n_full < n_gal:
            band_max.append(tile[:, n_full:].amax(1, keepdim=True))
        hot = (torch.cat(band_max, 1) >= floor[:, None]).T  # (bands, queries)
    else:
        band_max = [tile[:n_full].unflatten(0, (-1, _BAND)).amax(1)] if n_full else []
        if n_full < n_gal:
            band_max.append(tile[n_full:].amax(0, keepdim=True))
        hot = torch.cat(band_max, 0) >= floor[None, :]  # (bands, queries)
    band_ids, query_ids = hot.nonzero().unbind(1)
    if band_ids.numel() == 0:
        return None
    splits = torch.bincount(band_ids, minlength=len(bands)).tolist()
    parts = []
    for (g0, g1), qs in zip(bands, torch.split(query_ids, splits)):
        if qs.numel() == 0:
            continue
        fl, tp = floor.index_select(0, qs), top.index_select(0, qs)
        if queries_on_rows:
            sub = tile[:, g0:g1].index_select(0, qs)  # (queries, band)
            gt = sub > tp[:, None]
            above = gt.sum(1, dtype=torch.int32)
            r, c = (gt ^ (sub >= fl[:, None])).nonzero().unbind(1)
            parts.append((qs, above, qs[r], c + g0, sub[r, c]))
        else:
            sub = tile[g0:g1].index_select(1, qs)  # (band, queries)
            gt = sub > tp[None, :]
            above = gt.sum(0, dtype=torch.int32)
            r, c = (gt ^ (sub >= fl[None, :])).nonzero().unbind(1)
            parts.append((qs, above, qs[c], r + g0, sub[r, c]))
    return tuple(torch.cat(t) for t in zip(*parts))


def rank_positives(scorer, pos: Positives, max_k: int, *, symmetric: bool, block_size: int):
    """Exact number of negatives ranked before each needed positive.

    Returns ``(before, active)``: ``before[q, m]`` is exact for ``m < active[q]``;
    positives ``m >= active[q]`` are known to rank at or beyond the cap (see the
    module docstring), which is all the metrics need. Matrix products use all
    intra-op threads; the bookkeeping between them runs on one thread (many small
    operations: cheaper without synchronisation, and robust when other processes
    share the cores).
    """
    device = scorer.device
    nq = int(pos.count.shape[0])
    ng = int(scorer.g_codes.shape[0])
    max_r = pos.max_r
    scorer.set_positives(pos)
    if nq == 0 or max_r == 0:
        zeros = torch.zeros((nq, max_r), dtype=torch.int64, device=device)
        return zeros, torch.zeros(nq, dtype=torch.int64, device=device)
    threads = torch.get_num_threads()
    with _num_threads(1 if device.type == "cpu" else threads):
        return _rank_loop(scorer, pos, max_k, symmetric, block_size, nq, ng, max_r, threads)


def _rank_loop(scorer, pos, max_k, symmetric, block_size, nq, ng, max_r, threads):
    device = scorer.device
    ar = torch.arange(max_r, device=device)
    r_col = pos.count[:, None]
    cap = torch.where(ar[None, :] < r_col, r_col - ar[None, :], 0)
    cap[:, 0] = torch.where(pos.count > 0, torch.clamp(pos.count, min=max_k), 0)

    hist = torch.zeros((nq, max_r + 1), dtype=torch.int32, device=device)
    active = (cap > 0).sum(1)
    floor_table = scorer.floor_table
    top = scorer.top
    inactive = scorer.inactive_floor

    def floors_of(q, m):
        f = floor_table[q, (m - 1).clamp_min(0)]
        return torch.where(m > 0, f, inactive)

    floor = floors_of(torch.arange(nq, device=device), active)
    ambiguous = []  # (q, g, m1, m0) chunks

    # Same-label pairs are not negatives: they are masked in their tile.
    b = block_size
    nbq, nbg = (nq + b - 1) // b, (ng + b - 1) // b
    pq, pg = pos.pair_query, pos.pair_gallery
    bq, bg = pq // b, pg // b
    if symmetric:
        keep = bq <= bg
        pq, pg, bq, bg = pq[keep], pg[keep], bq[keep], bg[keep]
    tile_id = bq * nbg + bg
    order = torch.argsort(tile_id)
    pq, pg, tile_id = pq[order], pg[order], tile_id[order]
    tile_bounds = torch.searchsorted(tile_id, torch.arange(nbq * nbg + 1, device=device)).tolist()
    masked = None

    def consume(q0: int, g0: int, got):
        rows, above, cq, cg, v = got
        q = rows + q0
        hist[:, 0].index_add_(0, q, above)
        if len(cq):
            cq, cg = cq + q0, cg + g0
            m0, m1 = scorer.classify(cq, cg, v)
            hist.index_put_((cq, m0), torch.ones(1, dtype=torch.int32, device=device).expand(len(cq)),
                            accumulate=True)
            amb = m1 < m0
            if bool(amb.any()):
                ambiguous.append((cq[amb], cg[amb], m1[amb], m0[amb]))
        sure = hist[q].cumsum(1)[:, :max_r]
        act = (sure < cap[q]).sum(1)
        active[q] = act
        floor[q] = floors_of(q, act)

    for i in range(nbq):
        qs = slice(i * b, min(nq, (i + 1) * b))
        for j in range(i if symmetric else 0, nbg):
            gs = slice(j * b, min(ng, (j + 1) * b))
            do_rows = bool((floor[qs] != inactive).any())
            do_cols = symmetric and j != i and bool((floor[gs] != inactive).any())
            if not (do_rows or do_cols):
                continue
            with _num_threads(threads):
                tile = scorer.tile(qs, gs)
            if masked is None:
                masked = torch.tensor(scorer.masked_value, dtype=tile.dtype, device=device)
            t0, t1 = tile_bounds[i * nbg + j], tile_bounds[i * nbg + j + 1]
            if t1 > t0:
                tile.index_put_((pq[t0:t1] - qs.start, pg[t0:t1] - gs.start), masked)
            if symmetric and i == j:
                tile.diagonal().fill_(masked)
            if do_rows:
                got = _scan(tile, floor[qs], top[qs], queries_on_rows=True)
                if got is not None:
                    consume(qs.start, gs.start, got)
            if do_cols:
                got = _scan(tile, floor[gs], top[gs], queries_on_rows=False)
                if got is not None:
                    consume(gs.start, qs.start, got)
        if len(ambiguous) > 64:
            ambiguous[:] = [_prune_ambiguous(ambiguous, active)]

    before = hist.cumsum(1, dtype=torch.int64)[:, :max_r]
    if ambiguous:
        q, g, m1, m0 = _prune_ambiguous(ambiguous, active)
        if len(q):
            m_star = scorer.resolve(q, g, m1, m0)
            diff = torch.zeros((nq, max_r + 1), dtype=torch.int64, device=device)
            one = torch.ones(len(q), dtype=torch.int64, device=device)
            diff.index_put_((q, m_star), one, accumulate=True)
            diff.index_put_((q, m0), -one, accumulate=True)
            before += diff.cumsum(1)[:, :max_r]
    return before, active


def _prune_ambiguous(chunks, active):
    """Concatenate ambiguous candidates, keeping those that touch a needed threshold."""
    q = torch.cat([c[0] for c in chunks])
    g = torch.cat([c[1] for c in chunks])
    m1 = torch.cat([c[2] for c in chunks])
    m0 = torch.cat([c[3] for c in chunks])
    keep = m1 < active[q]
    return q[keep], g[keep], m1[keep], m0[keep]


# --------------------------------------------------------------------------- metrics


def per_query_ranks(before: torch.Tensor, active: torch.Tensor, count: torch.Tensor):
    """Per query: rank of the first correct match, average precision at R, R-precision.

    The first rank is exact when below the recall cap and ``int64`` max when the query
    has no correct match or its first one ranks at or beyond the cap; AP and
    R-precision are fractions (0 for queries without a correct match).
    """
    nq = int(count.shape[0])
    max_r = before.shape[1]
    has = count > 0
    big = torch.iinfo(torch.int64).max
    if max_r == 0:
        zero = torch.zeros(nq, dtype=torch.float64, device=count.device)
        return torch.full((nq,), big, dtype=torch.int64, device=count.device), zero, zero.clone()
    first = torch.where(has & (active > 0), before[:, 0], big)
    m = torch.arange(max_r, device=count.device)[None, :]
    position = m + before  # 0-based rank of the m-th positive (valid where m < active)
    relevant = (m < active[:, None]) & (position < count[:, None])
    r = count.clamp_min(1).to(torch.float64)
    ap = torch.where(relevant, (m + 1).to(torch.float64) / (position + 1).to(torch.float64), 0.0).sum(1) / r
    rp = relevant.sum(1).to(torch.float64) / r
    return first, ap, rp


def metrics_from_ranks(before: torch.Tensor, active: torch.Tensor, count: torch.Tensor, ks) -> dict:
    """Recall@K (percent of all queries), MAP@R and R-precision (percent, over queries with R > 0)."""
    nq = int(count.shape[0])
    first, ap, rp = per_query_ranks(before, active, count)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = 100.0 * int((first < k).sum()) / nq if nq else 0.0
    has = count > 0
    n_has = int(has.sum())
    if n_has == 0:
        out["map@r"] = None
        out["r_precision"] = None
    else:
        out["map@r"] = 100.0 * float(ap[has].sum()) / n_has
        out["r_precision"] = 100.0 * float(rp[has].sum()) / n_has
    return out

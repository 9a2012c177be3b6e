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
    "LabelGroups",
    "Positives",
    "QueryRanks",
    "build_positive_pairs",
    "FloatScorer",
    "cosine_from_score",
    "BinaryScorer",
    "rank_queries",
    "metrics_from_ranks",
    "per_query_ranks",
    "default_block_size",
    "PAIR_BUDGET",
]

_INT32_MIN = torch.iinfo(torch.int32).min
_INT32_MAX = torch.iinfo(torch.int32).max
_INT64_MIN = torch.iinfo(torch.int64).min
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


class LabelGroups:
    """The gallery grouped by label, to list any query's positives without a query-by-gallery table.

    ``count[q]`` is the number of positives of query q (its own image excluded in leave-one-out).
    """

    def __init__(self, query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool):
        query_labels = np.asarray(query_labels)
        uniq, g_ids = np.unique(np.asarray(gallery_labels), return_inverse=True)
        g_ids = g_ids.reshape(-1)
        self.exclude_self = exclude_self
        self.order = np.argsort(g_ids, kind="stable")  # gallery indices grouped by label, ascending within
        sizes = np.bincount(g_ids, minlength=len(uniq)).astype(np.int64)
        starts = np.cumsum(sizes) - sizes
        if len(uniq):
            slot = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
            found = uniq[slot] == query_labels
        else:
            slot = np.zeros(len(query_labels), dtype=np.int64)
            found = np.zeros(len(query_labels), dtype=bool)
        self.gallery_label = g_ids.astype(np.int64)  # label ids shared by queries and gallery; -1: unknown
        self.query_label = np.where(found, slot, -1).astype(np.int64)
        self.size = np.where(found, sizes[slot] if len(uniq) else 0, 0).astype(np.int64)
        self.start = np.where(found, starts[slot] if len(uniq) else 0, 0).astype(np.int64)
        self.count = self.size - (1 if exclude_self else 0) * (self.size > 0)

    def pairs(self, q0: int, q1: int) -> tuple[np.ndarray, np.ndarray]:
        """Positive pairs of queries ``q0..q1-1``: (local query index, gallery index), grouped by query,
        gallery indices ascending within a query."""
        size = self.size[q0:q1]
        local = np.repeat(np.arange(q1 - q0, dtype=np.int64), size)
        offset = np.arange(int(size.sum()), dtype=np.int64) - np.repeat(np.cumsum(size) - size, size)
        gallery = self.order[np.repeat(self.start[q0:q1], size) + offset].astype(np.int64)
        if self.exclude_self:
            keep = gallery != local + q0
            local, gallery = local[keep], gallery[keep]
        return local, gallery


def build_positive_pairs(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool):
    """All (query, gallery) pairs with equal labels, as two int64 arrays, grouped by query (ascending)
    and, within a query, by gallery index (ascending)."""
    groups = LabelGroups(query_labels, gallery_labels, exclude_self)
    return groups.pairs(0, len(np.asarray(query_labels)))


@dataclass
class Positives:
    """Positives of a range of queries, best-ranked first, padded to ``max_r`` columns.

    ``count[q]`` = R of local query q; ``index[q, m]`` / ``score[q, m]`` = gallery index
    and exact score (the scorer's ``exact_scores``) of its m-th ranked positive
    (``-1`` / minimum value as padding); ``offset`` is the first query's global index.
    """

    count: torch.Tensor  # (nq,) int64
    index: torch.Tensor  # (nq, max_r) int64
    score: torch.Tensor  # (nq, max_r) float64 or int64
    pair_query: torch.Tensor  # (P,) int64, every positive pair, local query index
    pair_gallery: torch.Tensor  # (P,) int64
    offset: int = 0

    @property
    def max_r(self) -> int:
        return int(self.index.shape[1])

    @classmethod
    def build(cls, pair_query, pair_gallery, score, num_queries: int, device, offset: int = 0) -> "Positives":
        """From pairs grouped by query with gallery indices ascending (as :class:`LabelGroups` lists them)."""
        pq = torch.as_tensor(np.asarray(pair_query, dtype=np.int64), device=device)
        pg = torch.as_tensor(np.asarray(pair_gallery, dtype=np.int64), device=device)
        sc = torch.as_tensor(score, device=device)
        counts = torch.bincount(pq, minlength=num_queries).to(torch.int64)
        max_r = int(counts.max()) if num_queries and len(pq) else 0
        ptr = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(pq), dtype=torch.int64, device=device) - ptr[pq]
        index = torch.full((num_queries, max_r), -1, dtype=torch.int64, device=device)
        index[pq, slot] = pg
        pad = float("-inf") if sc.dtype.is_floating_point else torch.iinfo(torch.int64).min
        table = torch.full((num_queries, max_r), pad, dtype=torch.float64 if sc.dtype.is_floating_point else torch.int64,
                           device=device)
        table[pq, slot] = sc.to(table.dtype)
        # rank order within a row: score descending; a stable sort keeps equal scores in gallery order
        table, order = torch.sort(table, dim=1, descending=True, stable=True)
        index = index.gather(1, order)
        return cls(counts, index, table, pq, pg, offset)


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


def canonical_rows(x: torch.Tensor) -> np.ndarray:
    """For every row, the index of the first row with the same bytes (itself when it has no earlier twin).

    Rows are hashed (their bytes as 64-bit words times random odd multipliers, summed modulo 2**64); only rows
    whose hashes collide are compared byte for byte.
    """
    x = x.detach().cpu().contiguous()
    if x.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16: compare the bits
        x = x.view(torch.int16)
    rows = np.ascontiguousarray(x.numpy())
    n = rows.shape[0]
    canon = np.arange(n, dtype=np.int64)
    if n < 2:
        return canon
    raw = rows.view(np.uint8).reshape(n, -1)
    padded = np.zeros((n, -(-raw.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, :raw.shape[1]] = raw
    words = padded.view(np.uint64)
    multipliers = np.random.default_rng(12345).integers(0, 2**63, words.shape[1], dtype=np.uint64) * 2 + 1
    hashes = np.zeros(n, dtype=np.uint64)
    for start in range(0, words.shape[1], 256):  # keeps the temporary small
        hashes += (words[:, start:start + 256] * multipliers[start:start + 256]).sum(axis=1, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")  # equal hashes: ascending row index
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):  # rare: duplicates or collisions
        leaders: list[int] = []
        for member in order[start:end]:
            twin = next((leader for leader in leaders if np.array_equal(raw[leader], raw[member])), None)
            if twin is None:
                leaders.append(member)
            else:
                canon[member] = twin
    return canon


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
        # Pairs per exact re-scoring step: one fixed shape per evaluation (see exact_scores), large enough
        # that the loop costs little beside the arithmetic (about 2 MB of float64 per operand).
        self._rescore_rows = max(128, min(8192, (1 << 18) // self.dim))
        self.num_gallery = int((xq if xg is None else xg).shape[0])
        self.xq = xq
        self.xg = xq if xg is None else xg
        self.q_codes, self.q_squared, self.q_eps = self._prepare(xq)
        if xg is None:
            self.g_codes, self.g_squared, self.g_eps = self.q_codes, self.q_squared, self.q_eps
        else:
            self.g_codes, self.g_squared, self.g_eps = self._prepare(xg)
        self.masked_value = float("-inf")
        self.inactive_floor = torch.tensor(float("inf"), dtype=self.tile_dtype, device=device)
        # Identical gallery vectors must tie exactly even where their scores come from different matrix
        # products (whose last bit depends on the product's shape): each item's first identical twin.
        canon = canonical_rows(self.xg)
        has_twin = np.bincount(canon, minlength=len(canon))[canon] > 1
        self.has_duplicates = bool(has_twin.any())
        self.canon = torch.from_numpy(canon).to(device)
        self.has_twin = torch.from_numpy(has_twin).to(device)

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
        swapped, on every CPU. Pairs are processed in chunks of exactly ``self._rescore_rows`` rows (the last
        one padded), so every pair goes through the same arithmetic whatever the batch: identical vectors
        always get bitwise identical scores (e.g. a negative that duplicates a positive): with one thread,
        torch's sum over the last dimension does the same additions for each row whatever the number of rows
        (a test checks this for this torch).
        """
        with _num_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):
            return self._exact_scores(qi, gi)

    def _exact_scores(self, qi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        n = len(qi)
        out = torch.empty(n, dtype=torch.float64, device=self.device)
        c = self._rescore_rows
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

    def block_scores(self, queries: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Scores of every (query, member) pair as one float64 matrix product: the positives of a large class.

        The dot products may differ from :meth:`exact_scores` in the last bits (another summation order);
        they agree exactly where the products and sums are exact (integer-valued embeddings), and identical
        vectors are made to tie by :meth:`equalize_duplicates` and :meth:`resolve`.
        """
        dots = self.xq.index_select(0, queries).to(torch.float64) @ self.xg.index_select(0, members).to(torch.float64).T
        denominator = self.q_squared[queries][:, None] * self.g_squared[members][None, :]
        return torch.where(denominator > 0, dots * dots.abs() / denominator, 0.0)

    def equalize_duplicates(self, local: torch.Tensor, gallery: torch.Tensor, scores: torch.Tensor) -> None:
        """Give every positive the score of its query's first identical positive, so duplicates tie exactly."""
        if not self.has_duplicates:
            return
        twins = self.has_twin[gallery].nonzero().squeeze(1)
        if twins.numel() == 0:
            return
        n = self.num_gallery
        group = local[twins] * n + self.canon[gallery[twins]]
        order = torch.argsort(group * n + gallery[twins])  # by group, then gallery index
        sorted_group = group[order]
        start = torch.ones_like(sorted_group, dtype=torch.bool)
        start[1:] = sorted_group[1:] != sorted_group[:-1]
        first = torch.cummax(torch.where(start, torch.arange(len(order), device=order.device), 0), 0).values
        scores[twins[order]] = scores[twins[order[first]]]

    def set_positives(self, pos: Positives) -> None:
        self.pos = pos
        eps_g = float(self.g_eps.max()) if self.g_eps.numel() else 0.0
        eps_q = self.q_eps[pos.offset: pos.offset + len(pos.count)]
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
        self._low_key = _ordered_int(self.thr_low).reshape(-1)
        self._flat_low, _ = _row_keys(self._low_key.view(self.thr_low.shape), self._span)
        self._neg_up = (-self.thr_up).contiguous()  # ascending rows, for whole-tile searches
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
        # m1 <= m0, and m1 < m0 only when the candidate is not surely below threshold m0 - 1: a second
        # search for those few.
        m1 = m0.clone()
        maybe = (m0 > 0) & (self._low_key[q * w + (m0 - 1).clamp_min(0)] <= key)
        if bool(maybe.any()):
            some = maybe.nonzero().squeeze(1)
            m1[some] = _row_count(self._flat_low, self._stride, w, self._span, q[some], key[some], strict=True)
        return m0, m1

    def classify_rows(self, q: torch.Tensor, values: torch.Tensor, g0: int):
        """:meth:`classify` for whole tile rows: ``values[i, j]`` is gallery ``g0 + j`` for local query ``q[i]``.

        Returns m0 for every element and the ambiguous candidates as ``(q, g, m1, m0)`` (or None).
        """
        v = values.to(torch.float32)
        m0 = torch.searchsorted(self._neg_up.index_select(0, q), v.neg(), right=True)
        low = self.thr_low.index_select(0, q).gather(1, (m0 - 1).clamp_min(0))
        maybe = (m0 > 0) & (low <= v)
        if not bool(maybe.any()):
            return m0, None
        r, c = maybe.nonzero().unbind(1)
        qq, m0_rc = q[r], m0[r, c]
        m1 = _row_count(self._flat_low, self._stride, self.pos.max_r, self._span, qq, _ordered_int(v[r, c]), strict=True)
        keep = m1 < m0_rc
        return m0, (qq[keep], (c + g0)[keep], m1[keep], m0_rc[keep])

    def resolve(self, q, g, m1, m0):
        """First threshold index in [m1, m0] that the exact key passes, per candidate.

        Positives are sorted by key, so "the candidate does not rank before positive m"
        holds on a prefix of each row: binary search inside [m1, m0).
        """
        order = torch.argsort(q * self.g_codes.shape[0] + g)  # query rows stay in cache
        exact = torch.empty(len(q), dtype=torch.float64, device=self.device)
        exact[order] = self.exact_scores(q[order] + self.pos.offset, g[order])
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
            if self.has_duplicates:  # an identical vector ties whatever product scored it
                above = torch.where(self.canon[g] == self.canon[tp.clamp_min(0)], g < tp, above)
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
            # finite: classify_rows turns tile values into int64 keys, and -inf has no integer
            self.masked_value = float(-(self.dim + 2))
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

    def block_scores(self, queries: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Exact integer scores of every (query, member) pair (float32 products of +-1 codes are exact)."""
        a = self.q_codes.index_select(0, queries).to(torch.float32)
        b = self.g_codes.index_select(0, members).to(torch.float32)
        return (a @ b.T).to(torch.int64)

    def equalize_duplicates(self, local, gallery, scores) -> None:
        """Integer scores: identical codes already tie exactly."""

    def classify_rows(self, q: torch.Tensor, values: torch.Tensor, g0: int):
        """:meth:`classify` for whole tile rows; binary keys are exact, so nothing is ambiguous."""
        n = self.num_gallery
        columns = torch.arange(g0, g0 + values.shape[1], device=self.device)
        key = values.to(torch.int64) * n + (n - 1 - columns)[None, :]
        return torch.searchsorted(self._neg_key.index_select(0, q), key.neg(), right=True), None

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
        self._neg_key = (-torch.where(valid, key, -self._span)).contiguous()  # ascending rows
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


# A tile in which this share of the live queries' elements reach their floors is classified whole, row by row.
_DENSE_SHARE = 0.25


def _hot_segments(tile: torch.Tensor, floor: torch.Tensor, queries_on_rows: bool):
    """(bands, hot): the gallery side cut into bands of ``_BAND`` items, and per (band, query) whether the
    segment's maximum reaches the query's floor (only those can hold candidates)."""
    n_gal = tile.shape[1] if queries_on_rows else tile.shape[0]
    n_full = n_gal // _BAND * _BAND
    bands = [(g0, min(n_gal, g0 + _BAND)) for g0 in range(0, n_gal, _BAND)]
    if queries_on_rows:
        band_max = [tile[:, :n_full].unflatten(1, (-1, _BAND)).amax(2)] if n_full else []
        if n_full < n_gal:
            band_max.append(tile[:, n_full:].amax(1, keepdim=True))
        return bands, (torch.cat(band_max, 1) >= floor[:, None]).T  # (bands, queries)
    band_max = [tile[:n_full].unflatten(0, (-1, _BAND)).amax(1)] if n_full else []
    if n_full < n_gal:
        band_max.append(tile[n_full:].amax(0, keepdim=True))
    return bands, torch.cat(band_max, 0) >= floor[None, :]  # (bands, queries)


def _scan(tile: torch.Tensor, bands, hot: torch.Tensor, floor: torch.Tensor, top: torch.Tensor, queries_on_rows: bool):
    """The candidates of a tile's hot segments, for one direction: queries on its rows, or on its columns.

    Returns ``None`` or ``(q, above, cand_q, cand_g, cand_val)`` with local indices: ``above[i]`` is the
    number of elements ``> top`` in a segment of query ``q[i]`` (they surely rank before every positive of
    that query), and the candidates are the elements in ``[floor, top]`` (``top >= floor`` always holds).
    """
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


# Padded positive slots (queries x their largest R) held at once: the evaluation's working memory grows with
# this, not with the number of queries times the largest class (about 80 bytes a slot: 0.7 GB).
PAIR_BUDGET = 1 << 23


def query_chunks(count: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Contiguous query ranges whose padded positive table (rows x largest R) fits ``budget`` slots."""
    chunks, start, widest = [], 0, 0
    for q, r in enumerate(count.tolist()):
        widest_with = max(widest, r, 1)
        if q > start and (q - start + 1) * widest_with > budget:
            chunks.append((start, q))
            start, widest_with = q, max(r, 1)
        widest = widest_with
    if len(count):
        chunks.append((start, len(count)))
    return chunks


def is_dense(positives_per_query: float, num_gallery: int) -> bool:
    """Whether queries with this many positives are ranked by sorting whole rows (:func:`_rank_dense`)."""
    return positives_per_query * DENSE_CLASS_RATIO >= num_gallery


def all_dense(groups: LabelGroups) -> bool:
    """Whether every query's class is large enough for the whole-row ranking (tile precision then unused)."""
    return bool(len(groups.count)) and bool(is_dense(groups.count.min(), len(groups.gallery_label)))


def rank_queries(scorer, groups: LabelGroups, max_k: int, *, symmetric: bool, block_size: int,
                 budget: int | None = None) -> QueryRanks:
    """Exact first-match rank, AP@R and R-precision of every query, a chunk of queries at a time.

    Each chunk holds its queries' positives (exact scores, sorted) and counters, at most ``budget`` padded
    slots; the tiles of a chunk cover its rows against the whole gallery (in leave-one-out, tiles inside
    the chunk serve its rows and its columns, so a single chunk computes only half the similarity matrix).
    """
    device = scorer.device
    budget = budget or PAIR_BUDGET
    nq = len(groups.count)
    first = np.full(nq, -1, dtype=np.int64)
    ap = np.zeros(nq, dtype=np.float64)
    rp = np.zeros(nq, dtype=np.float64)
    threads = torch.get_num_threads()
    num_gallery = len(groups.gallery_label)
    for c0, c1 in query_chunks(groups.count, budget):
        if is_dense(groups.count[c0:c1].mean(), num_gallery):
            # Classes so large that most of each row would be candidates anyway: sort whole rows instead.
            f, ap[c0:c1], rp[c0:c1] = _rank_dense(scorer, groups, c0, c1, budget, threads)
            first[c0:c1] = np.where(f < max_k, f, -1)
            continue
        local, gallery = groups.pairs(c0, c1)
        scores = _positive_scores(scorer, groups, c0, c1, local, gallery)
        pos = Positives.build(local, gallery, scores, c1 - c0, device, offset=c0)
        del local, gallery, scores
        with _num_threads(1 if device.type == "cpu" else threads):
            before, active = _rank_chunk(scorer, pos, max_k, symmetric, block_size, threads)
        f, a, r = per_query_ranks(before, active, pos.count)
        first[c0:c1], ap[c0:c1], rp[c0:c1] = f.cpu().numpy(), a.cpu().numpy(), r.cpu().numpy()
        del pos, before, active
    return QueryRanks(groups.count.copy(), first, ap, rp)


# A chunk whose queries have on average at least 1/DENSE_CLASS_RATIO of the gallery as positives is ranked
# by sorting whole rows (as a brute force would): counting against thresholds gains nothing there.
DENSE_CLASS_RATIO = 64


def _rank_dense(scorer, groups: LabelGroups, c0: int, c1: int, budget: int, threads: int):
    """First rank, AP@R and R-precision of queries c0..c1-1 from whole rows of scores.

    Scores come from one matrix product per block of rows (:meth:`block_scores`); identical gallery vectors
    get their first twin's score. Each row is sorted once (:func:`_positive_ranks`) and its positives'
    ranks read off in order, as a brute force would, without the brute force's second pass over the row.
    """
    device = scorer.device
    num_gallery = len(groups.gallery_label)
    members = torch.arange(num_gallery, device=device)
    step = max(1, budget // max(1, num_gallery))
    twins = getattr(scorer, "has_duplicates", False)
    representatives = twin_of = None
    if twins:
        representatives, twin_of = torch.unique(scorer.canon, return_inverse=True)
    out = []
    for r0 in range(c0, c1, step):
        r1 = min(c1, r0 + step)
        queries = torch.arange(r0, r1, device=device)
        with _num_threads(threads):
            if representatives is not None:  # each distinct vector scored once, copied to its twins
                scores = scorer.block_scores(queries, representatives)[:, twin_of]
            else:
                scores = scorer.block_scores(queries, members)
            selves = np.arange(r0, r1) if groups.exclude_self else None  # each row's own gallery item
            keys, stable = _sort_keys(scores.cpu().numpy(), selves, twins)
            del scores
            positive = groups.gallery_label[None, :] == groups.query_label[r0:r1, None]
            if selves is not None:
                positive[np.arange(r1 - r0), selves] = False
            counts = groups.count[r0:r1]
            rank = _positive_ranks(keys, positive, counts, threads, stable)
            del keys, positive
        # padding holds the int64 maximum: never within R
        within = rank < counts[:, None]
        share = np.divide(np.arange(1, rank.shape[1] + 1, dtype=np.float64)[None, :], rank + 1.0,
                          out=np.zeros(rank.shape), where=within)
        r = np.maximum(counts, 1).astype(np.float64)
        out.append((np.where(counts > 0, rank[:, 0], -1), share.sum(1) / r, within.sum(1) / r))
    first, ap, rp = (np.concatenate(parts) for parts in zip(*out))
    return first, ap, rp


def _sort_keys(scores: np.ndarray, selves: np.ndarray | None, twins: bool):
    """Ascending sort keys for rows of scores (higher score first), and whether every row needs the stable sort.

    Integer scores (binary codes: dot products in [-dim, dim]) tie often; negated into int16 where they
    fit, numpy's stable sort of them is a radix sort, linear in the row. Float scores tie only exactly
    (identical vectors, ``twins``: those rows all go to the stable sort). In leave-one-out row i's own item,
    ``selves[i]``, takes the largest key: last, never counted above a positive.
    """
    if np.issubdtype(scores.dtype, np.integer):
        bound = int(np.abs(scores).max()) if scores.size else 0
        keys = np.negative(scores).astype(np.int16 if bound < np.iinfo(np.int16).max else np.int64, copy=False)
        largest, stable = np.iinfo(keys.dtype).max, True
    else:
        keys = np.negative(scores)
        largest, stable = np.inf, twins
    if selves is not None:
        keys[np.arange(len(selves)), selves] = largest
    return keys, stable


def _positive_ranks(keys: np.ndarray, positive: np.ndarray, counts: np.ndarray, threads: int,
                    stable: bool = False) -> np.ndarray:
    """Per row, the ranks of its positives in ascending order (padded with the int64 maximum): their
    positions in the row sorted by ascending key, equal keys in gallery order.

    numpy's quicksort (vectorised where the CPU allows) orders a row; only a row whose sorted keys hold an
    exact tie is sorted again with the stable sort (``stable``: every row goes to the stable sort at once).
    Rows are shared out over ``threads`` threads: numpy releases the GIL while sorting.
    """
    from concurrent.futures import ThreadPoolExecutor

    width = max(1, int(counts.max()) if len(counts) else 1)
    ranks = np.full((keys.shape[0], width), np.iinfo(np.int64).max, dtype=np.int64)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            row = keys[i]
            if stable:
                order = np.argsort(row, kind="stable")
            else:
                order = np.argsort(row)
                ordered = row[order]
                if (ordered[1:] == ordered[:-1]).any():
                    order = np.argsort(row, kind="stable")
            hits = np.flatnonzero(positive[i, order])
            ranks[i, :len(hits)] = hits

    if threads <= 1 or keys.size < (1 << 20):  # small: starting threads costs more than it saves
        work(0, keys.shape[0])
    else:
        edges = np.linspace(0, keys.shape[0], threads + 1).astype(int)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, edges[:-1], edges[1:]))
    return ranks


# Classes at least this large have their positives scored as one matrix product per class.
_BLOCK_CLASS = 64


def _positive_scores(scorer, groups: LabelGroups, c0: int, c1: int, local: np.ndarray, gallery: np.ndarray):
    """Exact scores of the chunk's positive pairs (in the pairs' order): large classes by matrix products,
    the rest pair by pair."""
    device = scorer.device
    local_t, gallery_t = torch.from_numpy(local).to(device), torch.from_numpy(gallery).to(device)
    count = groups.count[c0:c1]
    big = groups.size[c0:c1] >= _BLOCK_CLASS
    if not big.any():
        scores = scorer.exact_scores(local_t + c0, gallery_t)
    else:
        ptr = np.cumsum(count) - count
        small_pairs = torch.from_numpy(~np.repeat(big, count)).to(device)
        scores = torch.empty(len(local), dtype=torch.float64 if scorer.kind == "float" else torch.int64, device=device)
        if bool(small_pairs.any()):
            scores[small_pairs] = scorer.exact_scores(local_t[small_pairs] + c0, gallery_t[small_pairs])
        big_queries = np.flatnonzero(big)
        for start in np.unique(groups.start[c0:c1][big_queries]):
            queries = big_queries[groups.start[c0:c1][big_queries] == start]
            members = groups.order[start:start + groups.size[c0 + queries[0]]]
            block = scorer.block_scores(torch.from_numpy(queries + c0).to(device), torch.from_numpy(members).to(device))
            if groups.exclude_self:  # drop each query's own column, keeping the others in gallery order
                keep = torch.ones(block.shape, dtype=torch.bool, device=device)
                keep[torch.arange(len(queries), device=device),
                     torch.from_numpy(np.searchsorted(members, queries + c0)).to(device)] = False
                block = block[keep].view(len(queries), -1)
            slots = torch.from_numpy(ptr[queries]).to(device)[:, None] + torch.arange(block.shape[1], device=device)
            scores[slots.reshape(-1)] = block.reshape(-1)
    scorer.equalize_duplicates(local_t, gallery_t, scores)
    return scores


def _gallery_blocks(pos: Positives, num_gallery: int, block_size: int, symmetric: bool) -> list[tuple[int, int, bool]]:
    """(start, end, inside) gallery blocks: in leave-one-out the chunk's own rows are blocks of their own."""
    c0, c1 = pos.offset, pos.offset + len(pos.count)
    spans = [(c0, c1, True), (0, c0, False), (c1, num_gallery, False)] if symmetric else [(0, num_gallery, False)]
    blocks = []
    for lo, hi, inside in spans:
        blocks += [(g, min(hi, g + block_size), inside) for g in range(lo, hi, block_size)]
    return sorted(blocks)


def _rank_chunk(scorer, pos: Positives, max_k: int, symmetric: bool, block_size: int, threads: int):
    """Exact number of negatives ranked before each needed positive of the chunk's queries.

    Returns ``(before, active)``: ``before[q, m]`` is exact for ``m < active[q]``; positives ``m >= active[q]``
    are known to rank at or beyond the cap (see the module docstring), which is all the metrics need. The
    loop is long because every tile is used twice in leave-one-out (its rows and, mirrored, its columns)
    and both uses share the counters; its steps are the helpers below.
    """
    device = scorer.device
    nq, max_r, c0 = len(pos.count), pos.max_r, pos.offset
    scorer.set_positives(pos)
    if nq == 0 or max_r == 0:
        zeros = torch.zeros((nq, max_r), dtype=torch.int64, device=device)
        return zeros, torch.zeros(nq, dtype=torch.int64, device=device)
    state = _ChunkState(scorer, pos, max_k)
    b = block_size
    row_blocks = [(q, min(c0 + nq, q + b)) for q in range(c0, c0 + nq, b)]
    gallery_blocks = _gallery_blocks(pos, scorer.num_gallery, b, symmetric)
    masks = _TileMasks(pos, row_blocks, gallery_blocks)
    for i, (q_lo, q_hi) in enumerate(row_blocks):
        for j, (g_lo, g_hi, inside) in enumerate(gallery_blocks):
            mirrored = symmetric and inside
            if mirrored and g_lo < q_lo:
                continue  # this tile was computed as (g, q) and its columns served these rows
            do_rows = state.any_active(q_lo - c0, q_hi - c0)
            do_cols = mirrored and g_lo != q_lo and state.any_active(g_lo - c0, g_hi - c0)
            if not (do_rows or do_cols):
                continue
            with _num_threads(threads):
                tile = scorer.tile(slice(q_lo, q_hi), slice(g_lo, g_hi))
            masks.apply(tile, i, j, scorer.masked_value, diagonal=mirrored and g_lo == q_lo)
            if do_rows:
                state.scan(tile, q_lo - c0, q_hi - c0, g_lo, queries_on_rows=True)
            if do_cols:
                state.scan(tile, g_lo - c0, g_hi - c0, q_lo, queries_on_rows=False)
        state.prune()
    return state.finish()


class _TileMasks:
    """Same-label pairs are not negatives: the positive pairs of each tile, to mask in it."""

    def __init__(self, pos: Positives, row_blocks, gallery_blocks):
        device = pos.count.device
        self.num_gallery_blocks = len(gallery_blocks)
        q = pos.pair_query + pos.offset
        g = pos.pair_gallery
        row_starts = torch.tensor([lo for lo, _ in row_blocks], dtype=torch.int64, device=device)
        gallery_starts = torch.tensor([lo for lo, _, _ in gallery_blocks], dtype=torch.int64, device=device)
        i = torch.searchsorted(row_starts, q, right=True) - 1
        j = torch.searchsorted(gallery_starts, g, right=True) - 1
        tile_id = i * self.num_gallery_blocks + j
        # Pairs come in ascending runs (per query, gallery ascending): a stable merge sort is nearly linear.
        order = torch.from_numpy(np.argsort(tile_id.cpu().numpy(), kind="stable")).to(device)
        self.q, self.g, tile_id = q[order], g[order], tile_id[order]
        self.row_starts, self.gallery_starts = row_starts.tolist(), gallery_starts.tolist()
        self.bounds = torch.searchsorted(tile_id, torch.arange(len(row_blocks) * self.num_gallery_blocks + 1,
                                                               device=device)).tolist()
        self._masked = None

    def apply(self, tile: torch.Tensor, i: int, j: int, masked_value, diagonal: bool) -> None:
        if self._masked is None:
            self._masked = torch.tensor(masked_value, dtype=tile.dtype, device=tile.device)
        t0, t1 = self.bounds[i * self.num_gallery_blocks + j], self.bounds[i * self.num_gallery_blocks + j + 1]
        if t1 > t0:
            tile.index_put_((self.q[t0:t1] - self.row_starts[i], self.g[t0:t1] - self.gallery_starts[j]), self._masked)
        if diagonal:
            tile.diagonal().fill_(self._masked)


class _ChunkState:
    """Per query of a chunk: counts of negatives surely before each positive, caps, floors, ambiguities.

    Tables are stored threshold-major (``[m, q]``): the running sums over thresholds are then vector adds
    across queries, many times faster than row-wise cumulative sums.
    """

    def __init__(self, scorer, pos: Positives, max_k: int):
        device = scorer.device
        nq, max_r = len(pos.count), pos.max_r
        self.scorer, self.max_r, self.device = scorer, max_r, device
        ar = torch.arange(max_r, device=device)[:, None]
        r_row = pos.count[None, :]
        self.cap = torch.where(ar < r_row, r_row - ar, 0)  # [m, q]
        self.cap[0] = torch.where(pos.count > 0, torch.clamp(pos.count, min=max_k), 0)
        self.hist = torch.zeros((max_r + 1, nq), dtype=torch.int32, device=device)  # [m, q]
        self.active = (self.cap > 0).sum(0)
        self.top = scorer.top
        self.floor = self._floors(torch.arange(nq, device=device), self.active)
        self.ambiguous = []  # (q, g, m1, m0) chunks
        self._one = torch.ones(1, dtype=torch.int32, device=device)

    def _floors(self, q, m):
        f = self.scorer.floor_table[q, (m - 1).clamp_min(0)]
        return torch.where(m > 0, f, self.scorer.inactive_floor)

    def any_active(self, lo: int, hi: int) -> bool:
        return bool((self.floor[lo:hi] != self.scorer.inactive_floor).any())

    def scan(self, tile: torch.Tensor, q_lo: int, q_hi: int, g0: int, queries_on_rows: bool) -> None:
        """Count one direction of a tile for local queries ``q_lo..q_hi-1`` against gallery ``g0 + j``."""
        rows = slice(q_lo, q_hi)
        floor = self.floor[rows]
        bands, hot = _hot_segments(tile, floor, queries_on_rows)
        # Candidates are the elements at or above their query's floor: when they are a large share of the tile
        # (large classes, crowded embeddings), one search per element beats gathering them one by one. Counting
        # them costs a pass over the tile, so only where the band maxima say it may pay.
        if hot.numel() and float(hot.sum()) > _DENSE_SHARE * hot.numel():
            candidates = (tile >= floor[:, None]) if queries_on_rows else (tile >= floor[None, :])
            if float(candidates.sum()) > _DENSE_SHARE * candidates.numel():
                self.consume_dense(q_lo, g0, tile if queries_on_rows else tile.T, q_hi - q_lo)
                return
        self.consume(q_lo, g0, _scan(tile, bands, hot, floor, self.top[rows], queries_on_rows), q_hi - q_lo)

    def consume_dense(self, q0: int, g0: int, values: torch.Tensor, rows: int) -> None:
        """Classify every element of the live rows at once (queries on rows): cheaper when most are candidates.

        Elements below a query's floor land on thresholds it no longer tracks, where they change nothing.
        """
        live = (self.floor[q0:q0 + rows] != self.scorer.inactive_floor).nonzero().squeeze(1)
        q = live + q0
        m0, ambiguous = self.scorer.classify_rows(q, values.index_select(0, live), g0)
        flat = (m0 * self.hist.shape[1] + q[:, None]).reshape(-1)
        self.hist.view(-1).index_add_(0, flat, self._one.expand(flat.numel()))
        if ambiguous is not None and len(ambiguous[0]):
            self.ambiguous.append(ambiguous)
        self._retire(q0, rows)

    def consume(self, q0: int, g0: int, got, rows: int) -> None:
        """Count a scanned tile's results for local queries ``q0..q0+rows-1`` against gallery ``g0 + columns``."""
        if got is None:
            return
        hot, above, cq, cg, v = got
        self.hist[0].index_add_(0, hot + q0, above)
        if len(cq):
            cq, cg = cq + q0, cg + g0
            m0, m1 = self.scorer.classify(cq, cg, v)
            self.hist.index_put_((m0, cq), self._one.expand(len(cq)), accumulate=True)
            amb = m1 < m0
            if bool(amb.any()):
                self.ambiguous.append((cq[amb], cg[amb], m1[amb], m0[amb]))
        self._retire(q0, rows)

    def _retire(self, q0: int, rows: int) -> None:
        """Retire thresholds whose count reached its cap: only the active ones can change."""
        span = slice(q0, q0 + rows)
        width = int(self.active[span].max())
        if width == 0:
            return
        sure = self.hist[:width, span].cumsum(0, dtype=torch.int32)
        act = (sure < self.cap[:width, span]).sum(0)
        self.active[span] = act
        self.floor[span] = self._floors(torch.arange(q0, q0 + rows, device=self.device), act)

    def prune(self) -> None:
        if len(self.ambiguous) > 64:
            self.ambiguous[:] = [_prune_ambiguous(self.ambiguous, self.active)]

    def finish(self):
        before = self.hist.cumsum(0, dtype=torch.int64)[:self.max_r].T
        if self.ambiguous:
            q, g, m1, m0 = _prune_ambiguous(self.ambiguous, self.active)
            if len(q):
                m_star = self.scorer.resolve(q, g, m1, m0)
                diff = torch.zeros((self.max_r + 1, len(self.active)), dtype=torch.int64, device=self.device)
                one = torch.ones(len(q), dtype=torch.int64, device=self.device)
                diff.index_put_((m_star, q), one, accumulate=True)
                diff.index_put_((m0, q), -one, accumulate=True)
                before = before + diff.cumsum(0)[:self.max_r].T
        return before, self.active


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
    out = {}
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

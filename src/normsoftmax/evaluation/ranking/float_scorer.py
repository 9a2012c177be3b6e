"""Cosine similarity, exactly: low-precision tiles with a rigorous error bound, float64 re-scoring.

The tile of a (query block, gallery block) is a bf16 (or TF32-grid float32, or float64) matrix product;
:meth:`FloatScorer.set_positives` turns each query's exact positive scores into thresholds widened by the
tile's error bound, so every tile value is surely above a threshold, surely below it, or ambiguous.
Ambiguous candidates are re-scored in float64 (:meth:`FloatScorer.exact_scores`: the signed squared
cosine, no square root) and compared by key. docs/evaluator.md derives the bound and explains the ties."""

from __future__ import annotations

import numpy as np
import torch

from .positives import Positives
from .threads import num_threads
from .thresholds import ordered_int, row_count, row_keys


def bf16_matmul_is_fast(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the build
        return False


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
    shared = ends - starts > 1  # rare: duplicates or hash collisions
    for start, end in zip(starts[shared], ends[shared], strict=True):
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
            low_precision = "bf16" if bf16_matmul_is_fast(device) else "tf32"
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
        with num_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):
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
        self._flat_up, self._stride = row_keys(ordered_int(self.thr_up), self._span)
        self._low_key = ordered_int(self.thr_low).reshape(-1)
        self._flat_low, _ = row_keys(self._low_key.view(self.thr_low.shape), self._span)
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
        key = ordered_int(val)
        w = self.pos.max_r
        m0 = row_count(self._flat_up, self._stride, w, self._span, q, key, strict=True)
        # m1 <= m0, and m1 < m0 only when the candidate is not surely below threshold m0 - 1: a second
        # search for those few.
        m1 = m0.clone()
        maybe = (m0 > 0) & (self._low_key[q * w + (m0 - 1).clamp_min(0)] <= key)
        if bool(maybe.any()):
            some = maybe.nonzero().squeeze(1)
            m1[some] = row_count(self._flat_low, self._stride, w, self._span, q[some], key[some], strict=True)
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
        m1 = row_count(self._flat_low, self._stride, self.pos.max_r, self._span, qq, ordered_int(v[r, c]), strict=True)
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

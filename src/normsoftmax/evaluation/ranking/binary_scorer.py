"""Hamming ranking of sign bits, as exact integer dot products of +-1 codes (D - 2 x Hamming).

int8 matrix products with int32 accumulation on the CPU, float32 products of +-1 elsewhere (exact below
2**24); keys (score, -index) are exact int64 numbers, so nothing is ever ambiguous."""

from __future__ import annotations

import torch

from .positives import Positives
from .threads import num_threads
from .thresholds import row_count, row_keys

INT32_MIN = torch.iinfo(torch.int32).min
INT32_MAX = torch.iinfo(torch.int32).max
INT64_MIN = torch.iinfo(torch.int64).min


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
        self.masked_value: float
        if self.tile_dtype == torch.int32:
            self.masked_value = INT32_MIN
            self.inactive_floor = torch.tensor(INT32_MAX, dtype=torch.int32, device=device)
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
        with num_threads(1 if self.device.type == "cpu" else torch.get_num_threads()):
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
        self.thr_key = torch.where(valid, key, torch.full_like(key, INT64_MIN))
        # keys are strictly decreasing along a row and lie in [-span, span]; padding -> -span
        self._span = (self.dim + 2) * max(1, self.num_gallery)
        self._flat_key, self._stride = row_keys(torch.where(valid, key, -self._span), self._span)
        self._neg_key = (-torch.where(valid, key, -self._span)).contiguous()  # ascending rows
        self.floor_table = torch.where(valid, pos.score, 0).to(self.tile_dtype)
        # a tile value > top[q] (the best positive's score) surely ranks before every positive of q
        if pos.max_r:
            self.top = torch.where(pos.count > 0, pos.score[:, 0], self.dim + 1).to(self.tile_dtype)
        else:
            self.top = torch.full((len(pos.count),), self.dim + 1, dtype=self.tile_dtype, device=self.device)

    def classify(self, q, g, val):
        key = self._key(val, g)
        m0 = row_count(self._flat_key, self._stride, self.pos.max_r, self._span, q, key, strict=True)
        return m0, m0

    def resolve(self, q, g, m1, m0):  # pragma: no cover - binary keys are never ambiguous
        raise AssertionError("binary ranking has no ambiguous candidates")

"""Counting, tile by tile, the negatives that rank before each positive of a chunk of queries.

Similarity tiles of the chunk's queries against the gallery are scanned in bands of 256 gallery items;
only (query, band) segments whose maximum reaches the query's *floor* (the lowest value that can still
change a needed count) are looked at. Elements above the best positive's threshold are counted; the few
between the floor and that threshold are classified by binary search over the query's thresholds, and
ambiguous ones re-scored exactly at the end. A count that reaches its cap retires its threshold, which
raises the floor; in leave-one-out every tile serves its rows and, mirrored, its columns."""

from __future__ import annotations

import numpy as np
import torch

from .positives import Positives
from .threads import num_threads

# Gallery items per band in a tile scan (see _scan).
_BAND = 256


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
    for (g0, g1), qs in zip(bands, torch.split(query_ids, splits), strict=True):
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
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))


def _gallery_blocks(pos: Positives, num_gallery: int, block_size: int, symmetric: bool) -> list[tuple[int, int, bool]]:
    """(start, end, inside) gallery blocks: in leave-one-out the chunk's own rows are blocks of their own."""
    c0, c1 = pos.offset, pos.offset + len(pos.count)
    spans = [(c0, c1, True), (0, c0, False), (c1, num_gallery, False)] if symmetric else [(0, num_gallery, False)]
    blocks = []
    for lo, hi, inside in spans:
        blocks += [(g, min(hi, g + block_size), inside) for g in range(lo, hi, block_size)]
    return sorted(blocks)


def rank_chunk(scorer, pos: Positives, max_k: int, symmetric: bool, block_size: int, threads: int):
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
            with num_threads(threads):
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
        self._masked: torch.Tensor | None = None

    def apply(self, tile: torch.Tensor, i: int, j: int, masked_value, diagonal: bool) -> None:
        if self._masked is None:
            self._masked = torch.tensor(masked_value, dtype=tile.dtype, device=tile.device)
        masked = self._masked
        t0, t1 = self.bounds[i * self.num_gallery_blocks + j], self.bounds[i * self.num_gallery_blocks + j + 1]
        if t1 > t0:
            tile.index_put_((self.q[t0:t1] - self.row_starts[i], self.g[t0:t1] - self.gallery_starts[j]), masked)
        if diagonal:
            tile.diagonal().fill_(masked)


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
        self.ambiguous: list[tuple[torch.Tensor, ...]] = []  # (q, g, m1, m0) chunks
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

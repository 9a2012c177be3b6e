"""The exact ranking engine: for every query, the ranks of its correct matches, without sorting the gallery
and without ever holding a query-by-gallery matrix.

Retrieval metrics need, per query, only the ranks of some correct matches ("positives"), and the rank of a
positive is the number of negatives ranked before it plus its place among the positives. So the engine
counts, for each (query, positive), the negatives that rank before it -- exactly, ties included (equal scores
ranked by gallery index). The parts, in the order the data flows through them:

- :mod:`.positives` -- each query's positives from the labels, and their exact scores;
- :mod:`.float_scorer`, :mod:`.binary_scorer` -- similarity tiles, thresholds with error bounds, exact
  re-scoring (cosine) or exact integer scores (Hamming on sign bits);
- :mod:`.thresholds` -- sorted threshold rows searched for many candidates at once;
- :mod:`.counting` -- the tile-by-tile count of negatives before each positive (ordinary classes);
- :mod:`.dense` -- whole rows sorted, for classes that hold a large share of the gallery;
- :mod:`.chunking` -- :func:`rank_queries`: queries a chunk at a time, each chunk by the cheaper way;
- :mod:`.query_ranks` -- ranks to Recall@K, MAP@R and R-precision;
- :mod:`.threads` -- one thread for bookkeeping, all of them for matrix products.

``docs/evaluator.md`` explains how it stays exact and fast, with the measurements behind each path.
"""

from .binary_scorer import BinaryScorer
from .chunking import (
    DENSE_CLASS_RATIO,
    PAIR_BUDGET,
    all_dense,
    default_block_size,
    is_dense,
    query_chunks,
    rank_queries,
)
from .float_scorer import FloatScorer, canonical_rows, cosine_from_score
from .positives import LabelGroups, Positives, build_positive_pairs
from .query_ranks import QueryRanks, metrics_from_ranks, per_query_ranks

__all__ = [
    "DENSE_CLASS_RATIO",
    "PAIR_BUDGET",
    "BinaryScorer",
    "FloatScorer",
    "LabelGroups",
    "Positives",
    "QueryRanks",
    "all_dense",
    "build_positive_pairs",
    "canonical_rows",
    "cosine_from_score",
    "default_block_size",
    "is_dense",
    "metrics_from_ranks",
    "per_query_ranks",
    "query_chunks",
    "rank_queries",
]

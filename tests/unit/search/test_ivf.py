"""IVF-PQ: parameters chosen from the collection's size, and an index that finds what the exact one finds."""

from __future__ import annotations

import numpy as np
import pytest

from normsoftmax.config import IndexAddConfig, IndexBuildConfig
from normsoftmax.search import SearchIndex, add_to_index, build_index, choose_ivf_parameters
from normsoftmax.search.index import MIN_IVF_VECTORS


@pytest.mark.parametrize("count, dim, expected", [
    # nlist: the power of two nearest 4 sqrt(N), at most train_count / 39; nprobe nlist / 16; pq_m dim / 16, >= 8
    (10_000, 32, (256, 16, 8, 10_000)),         # 4 sqrt(N) = 400 -> 512, but 10,000 / 39 = 256
    (200_000, 128, (2048, 128, 8, 100_000)),    # 1,789 -> 2048 (100,000 / 39 = 2,564)
    (1_000_000, 2048, (2048, 128, 128, 100_000)),  # 4,000 -> 4096, capped by the 100,000 training vectors
    (60_502, 100, (1024, 64, 10, 60_502)),      # 984 -> 1024; pq_m 8 does not divide 100: 10
    (20_000, 97, (512, 32, 97, 20_000)),        # a prime dim: one dimension per sub-quantizer
    (20_000, 4, (512, 32, 4, 20_000)),
])
def test_default_ivf_parameters(count, dim, expected):
    chosen = choose_ivf_parameters(count, dim)
    assert (chosen.nlist, chosen.nprobe, chosen.pq_m, chosen.train_count) == expected


def test_ivf_parameters_given_are_checked_not_changed():
    chosen = choose_ivf_parameters(50_000, 64, nlist=128, nprobe=32, pq_m=16, train_size=20_000)
    assert (chosen.nlist, chosen.nprobe, chosen.pq_m, chosen.train_count) == (128, 32, 16, 20_000)
    with pytest.raises(ValueError, match="nlist 1024 needs 39,936 training vectors.*raise --train_size"):
        choose_ivf_parameters(50_000, 64, nlist=1024, train_size=20_000)
    with pytest.raises(ValueError, match="nprobe must be between 1 and nlist"):
        choose_ivf_parameters(50_000, 64, nlist=128, nprobe=200)
    with pytest.raises(ValueError, match="pq_m must divide the embedding dimension 64"):
        choose_ivf_parameters(50_000, 64, pq_m=12)
    with pytest.raises(ValueError, match="use --kind flat"):
        choose_ivf_parameters(MIN_IVF_VECTORS - 1, 64)
    assert choose_ivf_parameters(MIN_IVF_VECTORS, 64).nlist >= 1


def test_ivf_index_finds_most_exact_neighbours_and_keeps_binary_codes(tmp_path, embeddings_file, clustered_vectors):
    vectors, labels = clustered_vectors(MIN_IVF_VECTORS + 16, 16, 200, seed=7, spread=0.5)
    file = embeddings_file("e.npz", vectors[:-16], labels[:-16])
    info = build_index(IndexBuildConfig(embeddings=str(file), out=str(tmp_path / "ivf"), kind="ivf", nlist=64))
    assert (info["nlist"], info["nprobe"], info["pq_m"], info["kinds"]) == (64, 4, 8, ["float", "binary"])
    build_index(IndexBuildConfig(embeddings=str(file), out=str(tmp_path / "flat")))
    ivf, flat = SearchIndex.open(tmp_path / "ivf"), SearchIndex.open(tmp_path / "flat")
    assert ivf.metadata["ivf"] == {"nlist": 64, "nprobe": 4, "pq_m": 8, "train_count": MIN_IVF_VECTORS}
    queries = vectors[:200]
    exact = flat.search(queries, k=10).ids

    def recall(nprobe):
        approximate = ivf.search(queries, k=10, nprobe=nprobe).ids
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact, strict=True)])

    assert recall(64) > 0.7  # every list: only the 8-byte PQ codes are approximate
    assert recall(1) < recall(64)  # probing fewer lists loses neighbours: nprobe is really applied
    # The binary codes are exact, as in a flat index.
    assert np.array_equal(ivf.search(queries, 5, "binary").ids, flat.search(queries, 5, "binary").ids)
    # Items search with their (PQ-reconstructed) vectors; appended items are encoded with the trained codebooks.
    assert np.mean(ivf.search_items(np.arange(50), k=1, nprobe=64).ids[:, 0] == np.arange(50)) > 0.8
    added = add_to_index(IndexAddConfig(index=str(tmp_path / "ivf"),
                                        embeddings=str(embeddings_file("more.npz", vectors[-16:]))))
    assert (added["count"], added["first_id"], added["nlist"]) == (MIN_IVF_VECTORS + 16, MIN_IVF_VECTORS, 64)
    reopened = SearchIndex.open(tmp_path / "ivf")
    assert reopened.count == reopened.float_index.ntotal == MIN_IVF_VECTORS + 16
    top = reopened.search(vectors[-16:], k=10, nprobe=64).ids
    assert np.mean([MIN_IVF_VECTORS + i in row for i, row in enumerate(top)]) > 0.8

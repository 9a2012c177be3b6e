"""faiss indexes in a folder (normsoftmax.search.index, .command): exact answers, round trips, refusals,
crash safety."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normsoftmax.config import IndexAddConfig, IndexBuildConfig
from normsoftmax.embedding.files import write_embeddings
from normsoftmax.evaluation.metrics import evaluate_embeddings
from normsoftmax.search import SearchIndex, add_to_index, build_index
from normsoftmax.search import index as index_module


def _numpy_cosine_top_k(gallery, queries, k):
    g = gallery.astype(np.float64) / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = q @ g.T
    return similarity, -np.sort(-similarity, axis=1)[:, :k]


def _numpy_hamming(gallery, queries):
    g, q = gallery > 0, queries > 0
    return (q[:, None, :] != g[None, :, :]).sum(axis=2)


def test_flat_search_is_exact_cosine_top_k(tmp_path, embeddings_file, clustered_vectors):
    vectors, labels = clustered_vectors(400, 24, 20, seed=1)
    queries, _ = clustered_vectors(30, 24, 20, seed=2)
    info = build_index(IndexBuildConfig(embeddings=str(embeddings_file("e.npz", vectors, labels)),
                                        out=str(tmp_path / "ix")))
    index = SearchIndex.open(info["path"])
    found = index.search(queries, k=10)
    similarity, best = _numpy_cosine_top_k(vectors, queries, 10)
    np.testing.assert_allclose(found.scores, best, atol=1e-5)  # the k best scores, in order
    np.testing.assert_allclose(np.take_along_axis(similarity, found.ids, 1), found.scores, atol=1e-5)  # of these ids
    assert np.array_equal(found.ids[:, 0], similarity.argmax(axis=1))


def test_binary_search_is_exact_hamming_ordered_by_distance_then_id(tmp_path, embeddings_file, clustered_vectors):
    vectors, _ = clustered_vectors(300, 20, 10, seed=3)  # 20 bits: padded to 24, padding must not count
    queries, _ = clustered_vectors(25, 20, 10, seed=4)
    index = SearchIndex.open(build_index(IndexBuildConfig(embeddings=str(embeddings_file("e.npz", vectors)),
                                                          out=str(tmp_path / "ix"), kind="binary"))["path"])
    assert index.kinds == ("binary",) and index.float_index is None
    found = index.search(queries, k=300, kind="binary")  # everything: the full order is defined
    distances = _numpy_hamming(vectors, queries)
    expected = np.lexsort((np.broadcast_to(np.arange(300), distances.shape), distances), axis=1)
    assert np.array_equal(found.ids, expected)
    assert np.array_equal(found.hamming, np.take_along_axis(distances, expected, 1))
    np.testing.assert_allclose(found.scores, 1 - found.hamming / 20)
    with pytest.raises(ValueError, match="holds only binary"):
        index.search(queries, kind="float")


@pytest.mark.parametrize("kind", ["float", "binary"])
def test_index_ranking_gives_the_evaluators_per_query_ranks(tmp_path, embeddings_file, clustered_vectors, kind):
    """Leave-one-out through the index (the query itself dropped) ranks correct matches exactly where
    evaluate_embeddings does, ties included (both order equal scores by id)."""
    vectors, labels = clustered_vectors(240, 16, 30, seed=5, spread=1.2)
    index = SearchIndex.open(build_index(IndexBuildConfig(embeddings=str(embeddings_file("e.npz", vectors, labels)),
                                                          out=str(tmp_path / "ix")))["path"])
    found = index.search_items(np.arange(240), k=240, kind=kind)
    ranks = []
    for query, row in enumerate(found.ids):
        others = row[row != query]
        hits = np.flatnonzero(labels[others] == labels[query])
        ranks.append(int(hits[0]) if len(hits) and hits[0] < 8 else -1)
    reference = evaluate_embeddings(vectors, labels, ks=(1, 2, 4, 8), nmi=False, return_per_query=True)
    assert np.array_equal(np.array(ranks), reference["per_query"][kind]["first_positive_rank"])
    assert 0 < np.mean(np.array(ranks) == 0) < 1  # a test that can fail both ways: some queries miss


def test_build_records_model_items_labels_and_source(tmp_path, embeddings_file, clustered_vectors):
    vectors, labels = clustered_vectors(50, 8, 3)
    file = embeddings_file("e.npz", vectors, labels, label_names=["cat", "dog", "owl"])
    info = build_index(IndexBuildConfig(embeddings=str(file), out=str(tmp_path / "ix")))
    assert (info["count"], info["kinds"], info["dim"]) == (50, ["float", "binary"], 8) and "nlist" not in info
    metadata = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert metadata["model"]["digest"] == embeddings_file.digest
    assert metadata["model"]["checkpoint"].endswith("epoch_001.pt")
    assert metadata["sources"][0]["file"] == str(file) and len(metadata["sources"][0]["sha256"]) == 64
    index = SearchIndex.open(tmp_path / "ix")
    assert index.path_of(7) == "/images/e.npz/00007.jpg"
    assert index.item(7) == {"id": 7, "path": "/images/e.npz/00007.jpg", "label": ["cat", "dog", "owl"][labels[7]]}
    with pytest.raises(KeyError, match="0 to 49"):
        index.path_of(50)
    # Building again from the same file is a no-op; from another file, a refusal that says what to do.
    assert build_index(IndexBuildConfig(embeddings=str(file), out=str(tmp_path / "ix")))["unchanged"] is True
    other = embeddings_file("f.npz", vectors[:10])
    with pytest.raises(ValueError, match=r"already holds an index \(50 items.*index add.*delete the folder"):
        build_index(IndexBuildConfig(embeddings=str(other), out=str(tmp_path / "ix")))
    with pytest.raises(ValueError, match="already holds an index"):
        build_index(IndexBuildConfig(embeddings=str(file), out=str(tmp_path / "ix"), kind="binary"))
    assert SearchIndex.open(tmp_path / "ix").count == 50


def test_add_continues_ids_maps_labels_by_name_and_replaces_the_generation(tmp_path, embeddings_file,
                                                                           clustered_vectors):
    vectors, labels = clustered_vectors(60, 12, 4, seed=6)
    build_index(IndexBuildConfig(embeddings=str(embeddings_file("a.npz", vectors[:40], labels[:40],
                                                                label_names=["w", "x", "y", "z"])),
                                                                out=str(tmp_path / "ix")))
    # The second file numbers its classes differently: names, not numbers, say which class an item is.
    renumbered = np.array([3, 2, 1, 0])[labels[40:]]
    more = embeddings_file("b.npz", vectors[40:], renumbered, label_names=["z", "y", "x", "new"])
    info = add_to_index(IndexAddConfig(index=str(tmp_path / "ix"), embeddings=str(more)))
    assert (info["count"], info["added"], info["first_id"]) == (60, 20, 40)
    index = SearchIndex.open(tmp_path / "ix")
    names = ["w", "x", "y", "z"]
    expected = [names[label] for label in labels[:40]] + [["z", "y", "x", "new"][label] for label in renumbered]
    assert [index.item(i).get("label") for i in range(60)] == expected
    assert index.path_of(45) == "/images/b.npz/00005.jpg"
    assert np.array_equal(index.search(vectors[40:], k=1).ids[:, 0], np.arange(40, 60))
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [
        ".lock", "binary.000002.faiss", "float.000002.faiss", "index.json", "items.000002.npz"]
    assert [s["first_id"] for s in index.metadata["sources"]] == [0, 40]


def test_add_refuses_another_model_another_dim_and_a_file_added_twice(tmp_path, embeddings_file, clustered_vectors):
    vectors, _ = clustered_vectors(30, 8, 3)
    first = embeddings_file("a.npz", vectors)
    build_index(IndexBuildConfig(embeddings=str(first), out=str(tmp_path / "ix")))
    before = (tmp_path / "ix" / "index.json").read_text()

    def add(file):
        return add_to_index(IndexAddConfig(index=str(tmp_path / "ix"), embeddings=str(file)))

    theirs, ours = embeddings_file.other_digest, embeddings_file.digest
    with pytest.raises(ValueError, match=f"model {theirs[:16]}.*model {ours[:16]}"):
        add(embeddings_file("other_model.npz", vectors, digest=theirs))
    with pytest.raises(ValueError, match="16-dimensional embeddings.*8-dimensional"):
        add(embeddings_file("wide.npz", np.hstack([vectors, vectors])))
    with pytest.raises(ValueError, match=r"already in the index .*ids 0 to 29.*nothing was added"):
        add(first)
    assert (tmp_path / "ix" / "index.json").read_text() == before


def test_build_refuses_bad_inputs_naming_the_file(tmp_path, embeddings_file, clustered_vectors):
    out = str(tmp_path / "ix")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        build_index(IndexBuildConfig(embeddings=str(tmp_path / "missing.npz"), out=out))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt.npz"):
        build_index(IndexBuildConfig(embeddings=str(corrupt), out=out))
    anonymous = tmp_path / "anonymous.npz"
    np.savez(anonymous, embeddings=np.ones((3, 4), np.float32), paths=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="anonymous.npz: no model metadata.*normsoftmax embed"):
        build_index(IndexBuildConfig(embeddings=str(anonymous), out=out))
    vectors, _ = clustered_vectors(500, 16, 5)
    inconsistent = tmp_path / "inconsistent.npz"
    write_embeddings(inconsistent, vectors, [f"{i}.jpg" for i in range(500)], metadata={"model": {"digest": "x",
                                                                                                  "dim": 32}})
    with pytest.raises(ValueError,
                       match="inconsistent.npz: holds 16-dimensional embeddings but says its model makes 32"):
        build_index(IndexBuildConfig(embeddings=str(inconsistent), out=out))
    with pytest.raises(ValueError, match=r"at least 9,984 vectors.*there are 500; use --kind flat"):
        build_index(IndexBuildConfig(embeddings=str(embeddings_file("small.npz", vectors)), out=out, kind="ivf"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not an index folder.*notes.txt"):
        build_index(IndexBuildConfig(embeddings=str(embeddings_file("e.npz", vectors)), out=str(occupied)))
    assert sorted(p.name for p in occupied.iterdir()) == [".lock", "notes.txt"]


def test_open_refuses_damaged_folders(tmp_path, embeddings_file, clustered_vectors):
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        SearchIndex.open(tmp_path)
    vectors, _ = clustered_vectors(40, 8, 3)
    build_index(IndexBuildConfig(embeddings=str(embeddings_file("e.npz", vectors)), out=str(tmp_path / "ix")))
    damaged = tmp_path / "ix" / "float.000001.faiss"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(ValueError, match="float.000001.faiss.*damaged"):
        SearchIndex.open(tmp_path / "ix")
    (tmp_path / "ix" / "items.000001.npz").unlink()
    (tmp_path / "ix" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        SearchIndex.open(tmp_path / "ix")


@pytest.mark.parametrize("failing", ["index.json", "binary index"])
def test_a_crash_during_add_leaves_the_committed_index(tmp_path, embeddings_file, clustered_vectors, monkeypatch,
                                                       failing):
    vectors, _ = clustered_vectors(50, 8, 3)
    build_index(IndexBuildConfig(embeddings=str(embeddings_file("a.npz", vectors[:30])), out=str(tmp_path / "ix")))
    index = SearchIndex.open(tmp_path / "ix")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if failing == "index.json":
        monkeypatch.setattr(index_module, "atomic_write", crash)
    else:
        monkeypatch.setattr(index_module.faiss, "write_index_binary", crash)
    more = embeddings_file("b.npz", vectors[30:])
    with pytest.raises(OSError, match="simulated crash"):
        index.add(*_read(more))
    monkeypatch.undo()
    # Disk and object both still hold the committed 30 items; the next add clears the unfinished generation.
    reopened = SearchIndex.open(tmp_path / "ix")
    assert reopened.count == index.count == index.float_index.ntotal == index.binary_index.ntotal == 30
    assert np.array_equal(reopened.search(vectors[:30], k=1).ids[:, 0], np.arange(30))
    index.add(*_read(more))
    assert SearchIndex.open(tmp_path / "ix").count == 50
    assert len(list((tmp_path / "ix").glob("*.faiss"))) == 2


def _read(file):
    from normsoftmax.search.command import read_source

    return read_source(file)


def test_paths_round_trip_whatever_their_characters(tmp_path):
    from normsoftmax.embedding.files import EmbeddingsFile

    paths = ["/données/été 1.jpg", "/x/\udcff-not-utf8.jpg", "/a/" + "long" * 200 + ".png", "/日本/画像.webp"]
    SearchIndex.create(tmp_path / "ix", EmbeddingsFile(np.eye(4, dtype=np.float32), paths))
    SearchIndex.open(tmp_path / "ix").add(EmbeddingsFile(np.eye(4, dtype=np.float32), paths[::-1]))
    index = SearchIndex.open(tmp_path / "ix")
    assert [index.path_of(i) for i in range(8)] == paths + paths[::-1]

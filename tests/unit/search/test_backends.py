"""The same collection operations on both backends -- an index folder (faiss) and a Milvus collection (Milvus
Lite: the embedded engine behind the same client) -- and the same answers from both."""

from __future__ import annotations

import numpy as np
import pytest

from normsoftmax.embedding.files import EmbeddingsFile
from normsoftmax.search import create_index, open_index
from normsoftmax.search.backends import milvus_location

DIGEST = "d" * 64


def _embeddings(count=60, dim=16, seed=0, first=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, dim))
    labels = rng.integers(0, 6, count)
    vectors = (centres[labels] + 0.3 * rng.standard_normal((count, dim))).astype(np.float32)
    paths = [f"/images/{first + i:04d}.jpg" for i in range(count)]
    return EmbeddingsFile(vectors, paths, labels, {"model": {"digest": DIGEST, "checkpoint": "/runs/x.pt"},
                                                   "label_names": [f"class{c}" for c in range(6)]})


@pytest.fixture(params=["faiss", "milvus"])
def backend(request, tmp_path):
    if request.param == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
        return request.param, milvus_location(str(tmp_path / "milvus.db"), "photos")
    return request.param, str(tmp_path / "index")


def test_build_search_get_add_remove(backend):
    name, location = backend
    embeddings = _embeddings()
    collection = create_index(location, embeddings, "flat", source={"file": "e.npz"})
    assert collection.count == 60 and set(collection.kinds) == {"float", "binary"} and collection.digest == DIGEST
    assert collection.item(7) == {"id": 7, "path": "/images/0007.jpg", "label": f"class{embeddings.labels[7]}"}
    found = collection.search(embeddings.embeddings[:5], k=3)
    assert found.ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(found.scores[:, 0], 1.0, atol=1e-5)
    codes = collection.search(embeddings.embeddings[:5], k=3, kind="binary")
    assert (codes.hamming[:, 0] == 0).all()

    new = collection.add_items(embeddings.embeddings[:2] * 3, ["/new/a.jpg", "/new/b.jpg"], ["fresh", None],
                               [{"sku": "A-1"}, None])
    assert new == [60, 61] and collection.count == 62
    assert collection.item(60) == {"id": 60, "path": "/new/a.jpg", "label": "fresh", "metadata": {"sku": "A-1"}}
    assert 60 in collection.search(embeddings.embeddings[:1], k=2).ids[0]  # a search after the add sees it

    assert collection.remove([0, 60]) == [0, 60] and collection.count == 60
    with pytest.raises(KeyError, match="no item 0: it was removed"):
        collection.item(0)
    assert 0 not in collection.search(embeddings.embeddings[:1], k=5).ids[0]
    with pytest.raises(KeyError, match="no item 999"):
        collection.remove([999])
    again = collection.add_items(embeddings.embeddings[:1], ["/new/c.jpg"])
    assert again == [62]  # ids are never reused, removed or not

    reopened = open_index(location) if name == "faiss" else collection  # Milvus Lite: one process per file
    assert reopened.count == 61 and reopened.item(62)["path"] == "/new/c.jpg"
    more = _embeddings(10, seed=1, first=100)
    added = reopened.add(more, {"file": "more.npz"})
    assert list(added) == list(range(63, 73)) and reopened.count == 71
    assert reopened.search_items([63], k=1).ids[0, 0] == 63


def test_both_backends_give_the_same_exact_neighbours(tmp_path):
    pytest.importorskip("milvus_lite")
    embeddings = _embeddings(200, dim=24, seed=3)
    folder = create_index(str(tmp_path / "ix"), embeddings)
    milvus = create_index(milvus_location(str(tmp_path / "m.db"), "same"), embeddings)
    queries = _embeddings(20, dim=24, seed=4).embeddings
    a, b = folder.search(queries, k=10), milvus.search(queries, k=10)
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores, atol=1e-5)
    a, b = folder.search(queries, k=10, kind="binary"), milvus.search(queries, k=10, kind="binary")
    assert np.array_equal(a.hamming, b.hamming)  # the ±1 inner products rank exactly as Hamming distance
    # where no tie straddles the cut, the same items
    for row in range(len(queries)):
        cut = a.hamming[row, -1]
        assert set(a.ids[row][a.hamming[row] < cut]) == set(b.ids[row][b.hamming[row] < cut])


def test_another_models_embeddings_and_a_taken_location_are_refused(backend):
    name, location = backend
    collection = create_index(location, _embeddings())
    with pytest.raises(ValueError, match="already holds"):
        create_index(location, _embeddings())

    class Other:
        digest, checkpoint = "e" * 64, "/runs/other.pt"

    with pytest.raises(ValueError, match="not comparable"):
        collection.check_model(Other())


def test_a_milvus_collection_built_by_another_process_opens_and_searches(tmp_path):
    # as `index build --backend milvus` then `serve` do: the building process ends, its collections are released
    pytest.importorskip("milvus_lite")
    import subprocess
    import sys

    from normsoftmax.embedding.files import write_embeddings

    embeddings = _embeddings(40, seed=5)
    source = tmp_path / "e.npz"
    write_embeddings(source, embeddings.embeddings, embeddings.paths, embeddings.labels, embeddings.metadata)
    database = tmp_path / "built.db"
    build = ("import sys; from normsoftmax.embedding.files import read_embeddings; "
             "from normsoftmax.search.backends import create_index, milvus_location; "
             "create_index(milvus_location(sys.argv[2], 'photos'), read_embeddings(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", build, str(source), str(database)], check=True, timeout=300)
    collection = open_index(milvus_location(str(database), "photos"))
    assert collection.count == 40
    found = collection.search(embeddings.embeddings[:3], k=1)
    assert list(found.ids[:, 0]) == [0, 1, 2]

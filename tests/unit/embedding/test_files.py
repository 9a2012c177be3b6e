"""Embeddings files (normsoftmax.embedding.files): round trips and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normsoftmax.embedding.files import load_embeddings_npz, save_embeddings_npz
from normsoftmax.evaluation.metrics import evaluate_embeddings
from retrieval_reference import _random_case, run


def test_npz_round_trip_leave_one_out(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _random_case(rng, 30, 6, 5, "gaussian")
    paths = [f"img/{i}.jpg" for i in range(30)]
    f = tmp_path / "emb.npz"
    save_embeddings_npz(f, embeddings=torch.from_numpy(x), labels=y, paths=paths)
    data = load_embeddings_npz(f)
    assert set(data) == {"embeddings", "labels", "paths"}
    np.testing.assert_array_equal(data["embeddings"], x)
    np.testing.assert_array_equal(data["labels"], y)
    assert data["paths"] == paths
    kwargs = {k: v for k, v in data.items() if k != "paths"}
    assert evaluate_embeddings(**kwargs, nmi=False) == run(x, y)


def test_npz_round_trip_query_gallery(tmp_path):
    rng = np.random.default_rng(1)
    xq, yq = _random_case(rng, 10, 6, 4, "gaussian")
    xg, yg = _random_case(rng, 20, 6, 4, "gaussian")
    f = tmp_path / "qg.npz"
    save_embeddings_npz(f, query_embeddings=xq, query_labels=yq, gallery_embeddings=xg, gallery_labels=yg,
                        query_paths=[f"q{i}" for i in range(10)], gallery_paths=[f"g{i}" for i in range(20)])
    data = load_embeddings_npz(f)
    assert data["paths"] == {"query": [f"q{i}" for i in range(10)], "gallery": [f"g{i}" for i in range(20)]}
    for key, value in (("query_embeddings", xq), ("query_labels", yq), ("gallery_embeddings", xg),
                       ("gallery_labels", yg)):
        np.testing.assert_array_equal(data[key], value)
    f2 = tmp_path / "nopaths.npz"
    save_embeddings_npz(f2, query_embeddings=xq, query_labels=yq, gallery_embeddings=xg, gallery_labels=yg)
    assert "paths" not in load_embeddings_npz(f2)


@pytest.mark.parametrize("arrays, message", [
    ({"embeddings": np.zeros((3, 2), np.float32)}, "missing key"),
    ({"labels": np.zeros(3, np.int64)}, "missing key"),
    ({"embeddings": np.zeros((3, 2), np.float32), "labels": np.zeros(4, np.int64)}, "3 embeddings"),
    ({"embeddings": np.zeros((3, 2), np.float32), "labels": np.zeros(3, np.int64),
      "query_labels": np.zeros(3, np.int64)}, "both"),
    ({"query_embeddings": np.zeros((3, 2), np.float32), "query_labels": np.zeros(3, np.int64),
      "gallery_embeddings": np.zeros((3, 2), np.float32)}, "missing key"),
    ({"embeddings": np.zeros((3, 2), np.float32), "labels": np.zeros(3, np.int64),
      "paths": np.array(["a", "b"])}, "paths has 2 entries"),
    ({"weights": np.zeros(3)}, "no embeddings"),
])
def test_load_npz_rejects_bad_files(tmp_path, arrays, message):
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        load_embeddings_npz(f)
    assert "bad.npz" in str(err.value)


def test_load_npz_rejects_non_npz(tmp_path):
    f = tmp_path / "junk.npz"
    f.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        load_embeddings_npz(f)

"""Retrieval metrics on embeddings (normsoftmax.evaluation.metrics): definitions, conventions, inputs, NMI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normsoftmax.evaluation.metrics import evaluate_embeddings, format_recall_lines
from retrieval_reference import _random_case, assert_metrics_equal, brute_force, run


def test_leave_one_out_excludes_the_query_itself():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    # query 0: own vector excluded; its negative 2 (cos .995) beats its positive 1 (cos 0)
    res = run(x, y, ks=(1, 2, 3))
    assert res["mode"] == "leave-one-out"
    assert res["num_queries"] == 4
    assert res["queries_without_positive"] == 0
    assert res["float"]["recall@1"] == 0.0
    assert res["float"]["recall@2"] == 50.0  # queries 0 and 1 find the positive at rank 1
    assert res["float"]["recall@3"] == 100.0
    assert res["float"]["map@r"] == 0.0
    assert res["float"]["r_precision"] == 0.0


def test_query_gallery_does_not_exclude_anything():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    q = g[:2].copy()
    res = evaluate_embeddings(query_embeddings=q, query_labels=[5, 6], gallery_embeddings=g,
                              gallery_labels=[5, 7, 6], ks=(1, 2), nmi=False)
    assert res["mode"] == "query-gallery"
    assert res["num_queries"] == 2
    # query 0 finds its identical gallery copy first; query 1's positive (0.7, 0.7) ranks second
    assert res["float"]["recall@1"] == 50.0
    assert res["float"]["recall@2"] == 100.0
    assert res["float"]["map@r"] == 50.0  # R = 1: only the top-1 counts, query 1 scores 0
    assert_metrics_equal(res["binary"], brute_force(q, [5, 6], g, [5, 7, 6], ks=(1, 2), binary=True))


@pytest.mark.parametrize("positive_first", [True, False])
def test_float_ties_broken_by_gallery_order(positive_first):
    q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    twin = [0.6, 0.8, 0.0]
    g = np.array([twin, twin, [0.0, 0.0, 1.0]], dtype=np.float32)  # items 0 and 1 tie exactly
    gl = [1, 2, 3] if positive_first else [2, 1, 3]
    res = evaluate_embeddings(query_embeddings=q, query_labels=[1], gallery_embeddings=g, gallery_labels=gl,
                              ks=(1, 2), nmi=False)
    assert res["float"]["recall@1"] == (100.0 if positive_first else 0.0)
    assert res["float"]["recall@2"] == 100.0
    assert res["float"]["map@r"] == (100.0 if positive_first else 0.0)


@pytest.mark.parametrize("positive_first", [True, False])
def test_binary_ties_broken_by_gallery_order(positive_first):
    # different float vectors, identical sign bits: a Hamming tie, but no float tie
    q = np.array([[1.0, 1.0, -1.0, 1.0]], dtype=np.float32)
    g = np.array([[0.1, 0.9, 0.5, 0.2], [0.9, 0.1, 0.3, 0.6], [-1.0, -1.0, 1.0, -1.0]], dtype=np.float32)
    gl = [1, 2, 3] if positive_first else [2, 1, 3]
    res = evaluate_embeddings(query_embeddings=q, query_labels=[1], gallery_embeddings=g, gallery_labels=gl,
                              ks=(1, 2), nmi=False)
    assert res["binary"]["recall@1"] == (100.0 if positive_first else 0.0)
    assert res["binary"]["recall@2"] == 100.0


def test_duplicate_of_a_positive_with_another_label_ties_exactly():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((40, 16)).astype(np.float32)
    g[7] = g[30]  # gallery 7 (negative) duplicates gallery 30 (the only positive)
    q = (g[30] + 0.3 * rng.standard_normal(16)).astype(np.float32)[None]
    gl = np.arange(40)
    res = evaluate_embeddings(query_embeddings=q, query_labels=[30], gallery_embeddings=g, gallery_labels=gl,
                              ks=(1, 2), nmi=False)
    assert res["float"]["recall@1"] == 0.0  # the tie goes to the lower index, the negative
    assert res["float"]["recall@2"] == 100.0
    assert res["binary"]["recall@1"] == 0.0


def test_class_with_one_image():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 1])  # class 1 has a single image
    res = run(x, y, ks=(1, 2))
    assert res["queries_without_positive"] == 1
    assert res["float"]["recall@1"] == pytest.approx(200 / 3)  # a miss for the lone image
    assert res["float"]["recall@2"] == pytest.approx(200 / 3)
    assert res["float"]["map@r"] == 100.0  # averaged over the two queries with a positive
    assert res["float"]["r_precision"] == 100.0


def test_no_query_has_a_positive():
    x = np.eye(3, dtype=np.float32)
    res = run(x, [0, 1, 2], ks=(1,))
    assert res["queries_without_positive"] == 3
    assert res["float"]["recall@1"] == 0.0
    assert res["float"]["map@r"] is None and res["float"]["r_precision"] is None


def test_k_larger_than_the_gallery():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [0.2, -1.0], [0.5, 0.5]], dtype=np.float32)
    y = np.array([0, 1, 0, 2, 1])
    res = run(x, y, ks=(1, 4, 100))
    want = brute_force(x, y, ks=(1, 4, 100))
    assert_metrics_equal(res["float"], want)
    assert res["float"]["recall@100"] == 80.0  # every query with a positive finds it; the lone one cannot


def test_result_shape_and_json():
    rng = np.random.default_rng(0)
    x, y = _random_case(rng, 50, 8, 10, "gaussian")
    res = evaluate_embeddings(x, y, nmi=False)
    assert set(res) == {"float", "binary", "num_queries", "queries_without_positive", "mode", "ks", "convention"}
    keys = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}
    assert set(res["float"]) == keys and set(res["binary"]) == keys
    assert res["float"]["nmi"] is None
    assert res["ks"] == [1, 2, 4, 8]
    assert all(type(v) is float for k, v in res["float"].items() if k != "nmi")
    assert type(res["num_queries"]) is int and type(res["queries_without_positive"]) is int
    assert "gallery order" in res["convention"]
    json.dumps(res)
    no_bin = evaluate_embeddings(x, y, nmi=False, binary=False)
    assert "binary" not in no_bin and no_bin["float"] == res["float"]


def test_nmi():
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(1)
    centres = 10 * rng.standard_normal((5, 16))
    y = np.repeat(np.arange(5), 20)
    x = (centres[y] + 0.1 * rng.standard_normal((100, 16))).astype(np.float32)
    res = evaluate_embeddings(x, y, seed=3)
    # the same computation by hand: seeded faiss k-means on the unit vectors, then sklearn's NMI
    unit = (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    km = faiss.Kmeans(16, 5, seed=3)
    km.train(unit)
    want = normalized_mutual_info_score(y, km.index.search(unit, 1)[1].ravel())
    assert res["float"]["nmi"] == pytest.approx(want, abs=1e-6)
    assert 0.8 < res["float"]["nmi"] <= 1.0
    assert 0.0 <= res["binary"]["nmi"] <= 1.0
    res_qg = evaluate_embeddings(query_embeddings=x[::2], query_labels=y[::2], gallery_embeddings=x[1::2],
                                 gallery_labels=y[1::2], binary=False)
    assert 0.8 < res_qg["float"]["nmi"] <= 1.0
    shuffled = evaluate_embeddings(x, rng.permutation(y), binary=False)
    assert shuffled["float"]["nmi"] < 0.5


def test_format_recall_lines():
    res = {"float": {"recall@1": 65.3612, "recall@2": 76.7572, "recall@4": 85.42, "recall@8": 91.5149},
           "binary": {"recall@1": 60.0, "recall@2": 70.0, "recall@4": 80.0, "recall@8": 90.004}, "ks": [1, 2, 4, 8]}
    lines = format_recall_lines(res)
    assert lines["float"] == "R@1, R@2, R@4, R@8: 65.36 & 76.76 & 85.42 & 91.51"
    assert lines["binary"] == "R@1, R@2, R@4, R@8: 60.00 & 70.00 & 80.00 & 90.00"
    del res["binary"]
    assert set(format_recall_lines(res)) == {"float"}


def test_torch_inputs_and_low_precision_dtypes():
    rng = np.random.default_rng(2)
    x, y = _random_case(rng, 80, 12, 15, "small_ints")
    want = run(x, y, ks=(1, 5))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = run(torch.from_numpy(x).to(dtype), torch.from_numpy(y), ks=(1, 5), device="cpu")
        assert got == want  # small integers are exact in every float dtype


X = np.zeros((4, 3), np.float32) + np.eye(4, 3, dtype=np.float32)
Y = np.array([0, 0, 1, 1])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "no embeddings"),
    ({"embeddings": X}, "needs both"),
    ({"labels": Y}, "needs both"),
    ({"embeddings": X, "labels": Y[:3]}, "3 entries but there are 4"),
    ({"embeddings": X[0], "labels": Y}, "2-D"),
    ({"embeddings": X.astype(np.int64), "labels": Y}, "floating-point"),
    ({"embeddings": np.where(X == 1, np.nan, X), "labels": Y}, "NaN"),
    ({"embeddings": np.where(X == 1, np.inf, X), "labels": Y}, "NaN or infinite"),
    ({"embeddings": X, "labels": Y.astype(np.float32)}, "integers"),
    ({"embeddings": X, "labels": Y[:, None]}, "1-D"),
    ({"embeddings": X[:0], "labels": Y[:0]}, "empty"),
    ({"embeddings": X, "labels": Y, "query_embeddings": X}, "not both"),
    ({"query_embeddings": X, "query_labels": Y, "gallery_embeddings": X}, "missing: gallery_labels"),
    ({"query_embeddings": X, "query_labels": Y, "gallery_embeddings": X[:, :2], "gallery_labels": Y},
     "dimension"),
    ({"embeddings": X, "labels": Y, "ks": ()}, "ks"),
    ({"embeddings": X, "labels": Y, "ks": (0, 1)}, "ks"),
    ({"embeddings": X, "labels": Y, "ks": (1, 1)}, "duplicates"),
    ({"embeddings": X, "labels": Y, "block_size": 0}, "block_size"),
])
def test_bad_inputs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(**kwargs, nmi=False)

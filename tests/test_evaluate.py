"""Tests of the retrieval evaluator (normsoftmax.evaluate, normsoftmax.retrieval)."""

from __future__ import annotations

import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import normsoftmax.evaluate  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from normsoftmax.evaluate import (
    evaluate_embeddings,
    format_recall_lines,
    load_embeddings_npz,
    save_embeddings_npz,
)
from normsoftmax.retrieval import (
    FloatScorer,
    Positives,
    build_positive_pairs,
    metrics_from_ranks,
    rank_positives,
)

METRIC_KEYS = ("map@r", "r_precision")


# --------------------------------------------------------------------------- reference


def _exact_integers(x) -> np.ndarray:
    """The rows of ``x`` as Python integers, each row scaled by a power of two (cosines unchanged), exactly."""
    x = np.asarray(x, dtype=np.float64)  # float16/32 -> float64 is exact
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    mantissa = (mantissa * 2.0**53).astype(np.int64)  # exact
    exponent = exponent - 53
    out = np.empty(x.shape, dtype=object)
    for i in range(x.shape[0]):
        nonzero = mantissa[i] != 0
        base = int(exponent[i][nonzero].min()) if nonzero.any() else 0
        out[i] = [int(m) << int(e - base) if m else 0 for m, e in zip(mantissa[i], exponent[i])]
    return out


def exact_cosine_order(xq, xg):
    """Per pair, a key that orders pairs exactly as their real-number cosines: sign(c) c**2 as a Fraction."""
    iq, ig = _exact_integers(xq), _exact_integers(xg)
    dots = iq.dot(ig.T)
    sq_q = (iq * iq).sum(1)
    sq_g = (ig * ig).sum(1)

    def key(i, j):
        d, den = dots[i, j], sq_q[i] * sq_g[j]
        return Fraction(d * abs(d), den) if den else Fraction(0)

    return key


def brute_force(xq, yq, xg=None, yg=None, ks=(1, 2, 4, 8), binary=False):
    """Obviously-correct reference: sort every query's gallery, walk the list.

    Float scores are compared exactly (rational arithmetic on the exact values of the inputs), so a tie is
    a real tie of cosines; binary scores are integers. Ties go to the lower gallery index.
    """
    loo = xg is None
    if loo:
        xg, yg = xq, yq
    if binary:
        scores = np.where(np.asarray(xq) > 0, 1, -1) @ np.where(np.asarray(xg) > 0, 1, -1).T

        def score(i, j):
            return int(scores[i, j])
    else:
        score = exact_cosine_order(xq, xg)
    hits = {k: 0 for k in ks}
    aps, rps = [], []
    for i in range(len(xq)):
        gallery = [j for j in range(len(xg)) if not (loo and j == i)]
        ranked = sorted(gallery, key=lambda j: (-score(i, j), j))  # ties: lower gallery index first
        rel = [yg[j] == yq[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        first = rel.index(True)
        for k in ks:
            hits[k] += first < k
        correct = 0
        ap = 0.0
        for pos in range(r):
            if rel[pos]:
                correct += 1
                ap += correct / (pos + 1)
        aps.append(ap / r)
        rps.append(correct / r)
    out = {f"recall@{k}": 100.0 * hits[k] / len(xq) for k in ks}
    out["map@r"] = 100.0 * float(np.mean(aps)) if aps else None
    out["r_precision"] = 100.0 * float(np.mean(rps)) if rps else None
    return out


def assert_metrics_equal(got: dict, want: dict, tol=1e-9):
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=tol), (key, got[key], value)


def run(x, y, **kw):
    kw.setdefault("nmi", False)
    return evaluate_embeddings(x, y, **kw)


# --------------------------------------------------------------------------- hand-made cases


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


# --------------------------------------------------------------------------- against brute force


def _random_case(rng, n, d, n_classes, kind):
    y = rng.integers(0, n_classes, n)
    if kind == "codes":  # +-1 codes of few bits: ties everywhere, for float and binary
        x = np.where(rng.random((n, d)) < 0.5, -1.0, 1.0).astype(np.float32)
    elif kind == "small_ints":  # exact float arithmetic: mathematical ties are exact ties
        x = rng.integers(-2, 3, (n, d)).astype(np.float32)
        x[np.abs(x).sum(1) == 0, 0] = 1.0
    else:
        x = rng.standard_normal((n, d)).astype(np.float32)
    return x, y


TILES = ["bf16", "tf32", "fp64"]  # every float tile path, forced: each is tested on every CPU


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["codes", "small_ints", "gaussian"])
def test_agrees_with_brute_force_leave_one_out(seed, kind, tiles):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 160))
    d = int(rng.integers(4, 9)) if kind != "gaussian" else int(rng.integers(2, 40))
    x, y = _random_case(rng, n, d, int(rng.integers(2, n // 2)), kind)
    ks = (1, 2, 4, 8, 16, 1000)
    res = run(x, y, ks=ks, block_size=int(rng.choice([3, 16, 64, 4096])), float_tiles=tiles)
    assert_metrics_equal(res["float"], brute_force(x, y, ks=ks))
    assert_metrics_equal(res["binary"], brute_force(x, y, ks=ks, binary=True))


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["codes", "small_ints", "gaussian"])
def test_agrees_with_brute_force_query_gallery(seed, kind, tiles):
    rng = np.random.default_rng(100 + seed)
    nq, ng = int(rng.integers(5, 80)), int(rng.integers(5, 150))
    d = int(rng.integers(4, 9))
    n_classes = int(rng.integers(2, 30))
    xq, yq = _random_case(rng, nq, d, n_classes, kind)
    xg, yg = _random_case(rng, ng, d, n_classes, kind)
    ks = (1, 3, 10, 500)
    res = evaluate_embeddings(query_embeddings=xq, query_labels=yq, gallery_embeddings=xg, gallery_labels=yg,
                              ks=ks, nmi=False, block_size=int(rng.choice([4, 32, 4096])), float_tiles=tiles)
    assert_metrics_equal(res["float"], brute_force(xq, yq, xg, yg, ks=ks))
    assert_metrics_equal(res["binary"], brute_force(xq, yq, xg, yg, ks=ks, binary=True))
    assert res["queries_without_positive"] == int(sum(1 for label in yq if label not in set(yg)))


def test_near_ties_below_low_precision_are_resolved_exactly():
    """Negatives within 1e-9 of a positive's score: bfloat16 cannot order them, float64 can."""
    rng = np.random.default_rng(7)
    d = 64
    q = rng.standard_normal(d)
    q /= np.linalg.norm(q)
    basis = np.linalg.qr(np.column_stack([q, rng.standard_normal((d, 40))]))[0][:, 1:]

    def at_cosine(c, k):
        return c * q + math.sqrt(1 - c * c) * basis[:, k]

    c = 0.61
    offsets = [-3e-9, -1e-9, 2e-9, 4e-9, -5e-9, 1e-8, 3e-10]
    g = [at_cosine(c, 0)] + [at_cosine(c + off, k + 1) for k, off in enumerate(offsets)]
    g += [at_cosine(c - 0.2, k + 20) for k in range(5)]
    g = np.array(g)  # float64 input: the exact scores differ by ~1e-9
    gl = [0] + list(range(1, len(g)))
    ks = (1, 2, 3, 4, 5, 6)
    res = evaluate_embeddings(query_embeddings=q[None], query_labels=[0], gallery_embeddings=g,
                              gallery_labels=gl, ks=ks, nmi=False, binary=False)
    want = brute_force(q[None], [0], g, gl, ks=ks)
    assert want["recall@4"] == 0.0 and want["recall@5"] == 100.0  # 4 negatives just above
    assert_metrics_equal(res["float"], want)


def test_low_precision_error_bound_holds():
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((20, 256))
    x = centres[rng.integers(0, 20, 600)] + 0.5 * rng.standard_normal((600, 256))
    xt = torch.from_numpy(x.astype(np.float32))
    for low in ("bf16", "tf32"):
        sc = FloatScorer(xt, None, torch.device("cpu"), low_precision=low)
        tile = sc.tile(slice(0, 600), slice(0, 600)).to(torch.float64)
        x64 = xt.to(torch.float64)
        x64 = x64 / x64.norm(dim=1, keepdim=True)
        exact = x64 @ x64.T
        eps_q, eps_g = sc.q_eps[:, None], float(sc.g_eps.max())
        acc = 2 * 256 * 2.0**-24 * (1 + eps_q) * (1 + eps_g)
        bound = eps_q + eps_g + 3 * eps_q * eps_g + acc + sc._rho * tile.abs()
        err = (exact - tile).abs()
        assert bool((err <= bound).all())
        assert float(err.max()) > 0  # the low-precision pass is really inexact


@pytest.mark.parametrize("other", ["tf32", "fp64"])
def test_other_tile_precisions_match_the_bf16_path(other):
    rng = np.random.default_rng(5)
    x, y = _random_case(rng, 300, 24, 60, "gaussian")
    xt = torch.from_numpy(x)
    pq, pg = build_positive_pairs(y, y, exclude_self=True)
    out = []
    for low in ("bf16", other):
        sc = FloatScorer(xt, None, torch.device("cpu"), low_precision=low)
        pos = Positives.build(pq, pg, sc.exact_scores(torch.from_numpy(pq), torch.from_numpy(pg)).numpy(),
                              len(y), torch.device("cpu"))
        before, active = rank_positives(sc, pos, 16, symmetric=True, block_size=64)
        out.append(metrics_from_ranks(before, active, pos.count, (1, 4, 16)))
    assert out[0] == out[1]
    assert_metrics_equal(out[0], brute_force(x, y, ks=(1, 4, 16)))


def test_crowded_similarities_switch_to_float64_tiles_and_stay_exact(monkeypatch):
    """An untrained network's embeddings: every cosine within ~1e-3, so bf16 would leave all pairs ambiguous."""
    import normsoftmax.evaluate as evaluate_module

    rng = np.random.default_rng(7)
    x = (rng.normal(size=32) + 0.02 * rng.normal(size=(400, 32))).astype(np.float32)
    y = np.repeat(np.arange(80), 5)
    chosen = []
    original = evaluate_module.FloatScorer

    def recording(*args, **kwargs):
        scorer = original(*args, **kwargs)
        chosen.append(scorer.low_precision)
        return scorer

    monkeypatch.setattr(evaluate_module, "FloatScorer", recording)
    result = run(x, y, ks=(1, 2, 4, 8), binary=False)
    assert chosen[-1] == "fp64"
    assert_metrics_equal(result["float"], brute_force(x, y))
    spread_out = rng.normal(size=(400, 32)).astype(np.float32)
    chosen.clear()
    run(spread_out, y, binary=False)
    assert chosen == ["bf16"] or chosen == ["tf32"]


# --------------------------------------------------------------------------- blocking


def test_blocked_results_equal_unblocked():
    rng = np.random.default_rng(21)
    sizes = rng.integers(1, 25, 50)
    y = rng.permutation(np.repeat(np.arange(50), sizes))
    centres = rng.standard_normal((50, 32))
    x = (centres[y] + 1.2 * rng.standard_normal((len(y), 32))).astype(np.float32)
    ks = (1, 2, 8, 50, 1000)
    results = [run(x, y, ks=ks, block_size=b) for b in (13, 64, 300, 10**6)]
    for other in results[1:]:
        assert other == results[0]
    assert 0 < results[0]["float"]["recall@1"] < 100
    nq = 80
    qg = [evaluate_embeddings(query_embeddings=x[:nq], query_labels=y[:nq], gallery_embeddings=x[nq:],
                              gallery_labels=y[nq:], ks=ks, nmi=False, block_size=b) for b in (5, 256, 10**6)]
    assert qg[0] == qg[1] == qg[2]


# --------------------------------------------------------------------------- result shape, NMI, formatting


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


# --------------------------------------------------------------------------- npz files


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


# --------------------------------------------------------------------------- bad inputs


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():  # pragma: no cover - no GPU on the development machines
    rng = np.random.default_rng(0)
    x, y = _random_case(rng, 500, 32, 80, "gaussian")
    want = run(x, y, ks=(1, 10))
    got = run(torch.from_numpy(x).cuda(), y, ks=(1, 10))
    assert got == want


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("kind", ["codes", "small_ints", "gaussian"])
@pytest.mark.parametrize("block_size", [64, 4096])
def test_one_large_class_among_small_ones_agrees_with_brute_force(kind, block_size, tiles):
    # thresholds are searched per query row: one query's R (299) must not leak into the others'
    rng = np.random.default_rng(7)
    x_big, _ = _random_case(rng, 300, 6, 1, kind)
    x_small, _ = _random_case(rng, 160, 6, 1, kind)
    x = np.concatenate([x_big, x_small])
    y = np.concatenate([np.zeros(300, dtype=np.int64), 1 + rng.integers(0, 40, 160)])
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    ks = (1, 2, 4, 8, 16, 100, 1000)
    res = run(x, y, ks=ks, block_size=block_size, float_tiles=tiles)
    assert_metrics_equal(res["float"], brute_force(x, y, ks=ks))
    assert_metrics_equal(res["binary"], brute_force(x, y, ks=ks, binary=True))


_ISA_SCRIPT = """
import json, sys
import numpy as np
from normsoftmax.evaluate import evaluate_embeddings
data = np.load(sys.argv[1])
out = {tiles: evaluate_embeddings(data["x"], data["y"], ks=(1, 2, 4, 8, 16), nmi=False, float_tiles=tiles)
       for tiles in ("bf16", "tf32", "fp64", "auto")}
print(json.dumps(out))
"""


@pytest.mark.parametrize("limits", [
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
])
def test_same_metrics_with_the_instruction_set_limited(tmp_path, limits):
    """oneDNN, ATen and MKL pick kernels by instruction set; run in a subprocess limited to AVX2."""
    import os
    import subprocess

    rng = np.random.default_rng(4)  # small integers: many exact ties of different vectors
    x, y = _random_case(rng, 121, 8, 40, "small_ints")
    np.savez(tmp_path / "case.npz", x=x, y=y)
    env = {**os.environ, **limits, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "case.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    ks = (1, 2, 4, 8, 16)
    want_float, want_binary = brute_force(x, y, ks=ks), brute_force(x, y, ks=ks, binary=True)
    for tiles, result in results.items():
        assert_metrics_equal(result["float"], want_float)
        assert_metrics_equal(result["binary"], want_binary)
    assert results["bf16"] == results["fp64"] == results["tf32"]

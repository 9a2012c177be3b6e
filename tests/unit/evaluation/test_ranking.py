"""The exact ranking engine (normsoftmax.evaluation.ranking) against an exact reference: every tile path,
block size, tie and instruction set."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from normsoftmax.evaluation.metrics import evaluate_embeddings
from normsoftmax.evaluation.ranking import FloatScorer, LabelGroups, metrics_from_ranks, rank_queries
from retrieval_reference import _random_case, assert_metrics_equal, brute_force, run

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
    groups = LabelGroups(y, y, exclude_self=True)
    out = []
    for low in ("bf16", other):
        sc = FloatScorer(xt, None, torch.device("cpu"), low_precision=low)
        ranks = rank_queries(sc, groups, 16, symmetric=True, block_size=64)
        out.append(metrics_from_ranks(ranks, (1, 4, 16)))
    assert out[0] == out[1]
    assert_metrics_equal(out[0], brute_force(x, y, ks=(1, 4, 16)))


def test_crowded_similarities_switch_to_float64_tiles_and_stay_exact(monkeypatch):
    """An untrained network's embeddings: every cosine within ~1e-3, so bf16 would leave all pairs ambiguous."""
    import normsoftmax.evaluation.metrics as evaluate_module

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
from normsoftmax.evaluation.metrics import evaluate_embeddings
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
    for result in results.values():
        assert_metrics_equal(result["float"], want_float)
        assert_metrics_equal(result["binary"], want_binary)
    assert results["bf16"] == results["fp64"] == results["tf32"]



@pytest.fixture(params=["thresholds", "dense", "thresholds-chunked", "dense-chunked"])
def engine(request, monkeypatch):
    """Force each way of ranking: counting against thresholds, or sorting whole rows; in one chunk or many."""
    from normsoftmax.evaluation.ranking import chunking

    monkeypatch.setattr(chunking, "DENSE_CLASS_RATIO", 10**12 if request.param.startswith("dense") else 0)
    if request.param.endswith("chunked"):
        monkeypatch.setattr(chunking, "PAIR_BUDGET", 97)
    return request.param


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("kind", ["codes", "small_ints", "gaussian"])
def test_every_engine_agrees_with_brute_force(engine, kind, tiles):
    rng = np.random.default_rng(11)
    x_big, _ = _random_case(rng, 90, 6, 1, kind)
    x_small, _ = _random_case(rng, 70, 6, 1, kind)
    x = np.concatenate([x_big, x_small, x_big[:5]])  # and five exact duplicates with other labels
    y = np.concatenate([np.zeros(90, dtype=np.int64), 1 + rng.integers(0, 12, 70), np.full(5, 20)])
    perm = rng.permutation(len(y))
    x, y = x[perm], y[perm]
    ks = (1, 2, 4, 8, 100)
    res = run(x, y, ks=ks, block_size=16, float_tiles=tiles)
    assert_metrics_equal(res["float"], brute_force(x, y, ks=ks))
    assert_metrics_equal(res["binary"], brute_force(x, y, ks=ks, binary=True))
    xq, yq, xg, yg = x[:60], y[:60], x[60:], y[60:]
    res = evaluate_embeddings(query_embeddings=xq, query_labels=yq, gallery_embeddings=xg, gallery_labels=yg,
                              ks=ks, nmi=False, block_size=16, float_tiles=tiles)
    assert_metrics_equal(res["float"], brute_force(xq, yq, xg, yg, ks=ks))
    assert_metrics_equal(res["binary"], brute_force(xq, yq, xg, yg, ks=ks, binary=True))


def test_chunks_hold_at_most_the_budget_of_positive_slots(monkeypatch):
    """Memory grows with the positive pairs of a chunk, not with queries x the largest class."""
    from normsoftmax.evaluation.ranking import Positives, chunking

    rng = np.random.default_rng(3)
    y = np.concatenate([np.zeros(400, dtype=np.int64), rng.integers(1, 100, 600)])  # one class of 400
    x = rng.standard_normal((len(y), 8)).astype(np.float32)
    budget = 4000
    monkeypatch.setattr(chunking, "PAIR_BUDGET", budget)
    monkeypatch.setattr(chunking, "DENSE_CLASS_RATIO", 0)
    tables = []
    original = Positives.build.__func__

    def recording(cls, *args, **kwargs):
        built = original(cls, *args, **kwargs)
        tables.append(built.index.numel())
        return built

    monkeypatch.setattr(Positives, "build", classmethod(recording))
    ks = (1, 4, 16)
    res = run(x, y, ks=ks, binary=False)
    assert_metrics_equal(res["float"], brute_force(x, y, ks=ks))
    assert len(tables) > 10 and max(tables) <= budget  # padded to the largest class: 1000 x 399 slots

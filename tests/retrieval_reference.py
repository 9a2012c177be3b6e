"""An obviously-correct retrieval reference for the evaluator's tests: exact cosines, full sorts."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from normsoftmax.evaluation.metrics import evaluate_embeddings


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
        out[i] = [int(m) << int(e - base) if m else 0 for m, e in zip(mantissa[i], exponent[i], strict=True)]
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
    hits = dict.fromkeys(ks, 0)
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

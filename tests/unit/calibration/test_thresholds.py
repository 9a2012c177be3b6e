"""Match thresholds: every rate at every threshold equals a brute-force count over all pairs (cosine and Hamming,
ties at the threshold included), and the held-out half never shares a class with the fit half."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from normsoftmax.calibration import Target, calibrate_thresholds
from normsoftmax.calibration import pairs as pairs_module
from normsoftmax.calibration.pairs import float_pairs, hamming_pairs
from normsoftmax.calibration.thresholds import (
    choose_float,
    choose_hamming,
    float_rates_at,
    hamming_rates_at,
    split_classes,
)


def _labelled(seed: int, classes: int = 12, per_class: int = 5, dim: int = 16, ties: bool = False):
    """Integer-valued embeddings (dot products and norms exact in float64, so every way of computing a cosine gives
    the same bits); with ``ties``, small integers: many exactly equal cosines and Hamming distances."""
    rng = np.random.default_rng(seed)
    scale = 1.5 if ties else 12.0
    centres = rng.standard_normal((classes, dim)) * scale
    labels = np.repeat(np.arange(classes), per_class)
    x = np.round(centres[labels] + rng.standard_normal((len(labels), dim)) * 0.8 * scale)
    x[x == 0] = 1
    return x.astype(np.float32), labels


def _brute(x, labels):
    """Every pair (i < j), one at a time: cosine (as the rational d / sqrt(|q|^2 |g|^2), correctly rounded), the
    Hamming distance of the sign bits, same class or not."""
    from fractions import Fraction

    bits = x > 0
    rows = []
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = [int(v) for v in x[i]], [int(v) for v in x[j]]
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        squared = Fraction(dot * dot, sum(p * p for p in a) * sum(q * q for q in b))
        cosine = float(np.sign(dot)) * float(np.sqrt(float(squared)))
        rows.append((cosine, int((bits[i] != bits[j]).sum()), labels[i] == labels[j]))
    return rows


@pytest.mark.parametrize("ties", [False, True])
def test_cosine_rates_equal_a_brute_force_count_at_every_genuine_score(ties, monkeypatch):
    monkeypatch.setattr(pairs_module, "TILE", 7)  # many tiles, ragged edges
    x, labels = _labelled(1, ties=ties)
    brute = _brute(x, labels)
    counted = float_pairs(x, labels, extra_edges=[0.123456])
    genuine = sorted(c for c, _, same in brute if same)
    assert np.allclose(counted.genuine, genuine, rtol=0, atol=1e-12)
    for threshold in sorted(set(counted.genuine.tolist())) + [0.123456]:
        rates = float_rates_at(counted, threshold)
        tp = sum(same and c >= threshold for c, _, same in brute)
        fp = sum((not same) and c >= threshold for c, _, same in brute)
        assert (rates["tp"], rates["fp"]) == (tp, fp), threshold
    assert counted.impostors == sum(not same for _, _, same in brute)


@pytest.mark.parametrize("ties", [False, True])
def test_hamming_counts_equal_a_brute_force_count(ties, monkeypatch):
    monkeypatch.setattr(pairs_module, "TILE", 5)
    x, labels = _labelled(2, ties=ties)
    brute = _brute(x, labels)
    counted = hamming_pairs(x, labels)
    for h in range(x.shape[1] + 1):
        assert counted.genuine[h] == sum(same and d == h for _, d, same in brute)
        assert counted.impostor[h] == sum((not same) and d == h for _, d, same in brute)
        rates = hamming_rates_at(counted, h)
        assert rates["tp"] == sum(same and d <= h for _, d, same in brute)  # ties at the threshold match


def test_the_chosen_threshold_is_the_most_permissive_that_meets_the_target():
    x, labels = _labelled(3, classes=20)
    counted = float_pairs(x, labels)
    for target in (Target("precision", 0.9), Target("fmr", 0.01)):
        threshold = choose_float(counted, target)
        assert threshold is not None and target.met(float_rates_at(counted, threshold))
        lower = [t for t in np.unique(counted.genuine) if t < threshold]
        assert all(not target.met(float_rates_at(counted, float(t))) for t in lower)
    codes = hamming_pairs(x, labels)
    h = choose_hamming(codes, Target("fmr", 0.01))
    assert h is not None and hamming_rates_at(codes, h)["fmr"] <= 0.01 < hamming_rates_at(codes, h + 1)["fmr"]


def test_an_unreachable_target_says_so():
    x, labels = _labelled(4, classes=16)
    x = np.concatenate([x, x])  # every image again, under another class: an impostor at cosine 1 for each
    labels = np.concatenate([labels, labels + 100])
    result = calibrate_thresholds(x, labels, [Target("precision", 0.999999)], seed=0)
    assert result["kinds"]["float"]["decisions"][0]["reachable"] is False


def test_the_halves_never_share_a_class_and_rates_are_measured_on_the_held_out_half():
    x, labels = _labelled(5, classes=30, per_class=4)
    fit, held_out = split_classes(labels, seed=0)
    assert not set(labels[fit]) & set(labels[held_out]) and (fit | held_out).all()
    assert abs(len(set(labels[fit])) - len(set(labels[held_out]))) <= 1
    result = calibrate_thresholds(x, labels, [Target("precision", 0.9), Target("fmr", 0.001)], seed=0)
    assert result["split"]["fit"]["classes"] + result["split"]["held_out"]["classes"] == 30
    decision = result["kinds"]["float"]["decisions"][0]
    # the held-out rates are the brute-force rates of the held-out half alone at the fitted threshold
    brute = _brute(x[held_out], labels[held_out])
    tp = sum(same and c >= decision["threshold"] for c, _, same in brute)
    fp = sum((not same) and c >= decision["threshold"] for c, _, same in brute)
    assert (decision["held_out"]["tp"], decision["held_out"]["fp"]) == (tp, fp)
    binary = result["kinds"]["binary"]["decisions"][1]
    brute_fp = sum((not same) and d <= binary["hamming"] for _, d, same in brute)
    assert binary["held_out"]["fp"] == brute_fp and binary["threshold"] == 1 - binary["hamming"] / 16
    # another seed splits the classes differently
    other, _ = split_classes(labels, seed=1)
    assert set(labels[other]) != set(labels[fit])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="N x D embeddings and N labels"):
        calibrate_thresholds(np.zeros((3, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        calibrate_thresholds(np.ones((4, 4)), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Target("precision", 1.0)

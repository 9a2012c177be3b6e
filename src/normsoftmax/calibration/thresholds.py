"""Match thresholds with known error rates, chosen on one half of the classes and measured on the other.

For a target -- a precision to reach (``precision >= 0.99``) or a false match rate not to exceed
(``fmr <= 0.001``) -- the threshold is the most permissive one that meets it on the *fit* half of the classes
(the largest recall: thresholds are only ever worth placing at a genuine pair's score). Its rates are then
counted on the *held-out* half, whose classes the choice never saw: those are the rates to expect. Classes are
split by the SHA-256 of their label, so the split depends on nothing else and no class is in both halves.

Rates over pairs: precision = TP / (TP + FP), recall (TMR) = TP / genuine pairs, FMR = FP / impostor pairs,
FNMR = 1 - recall. A pair matches when cosine >= threshold, or Hamming distance <= threshold: ties match.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .pairs import FloatPairs, HammingPairs, float_pairs, hamming_pairs

CURVE_POINTS = 200


@dataclass(frozen=True)
class Target:
    """``precision`` at least ``value``, or ``fmr`` at most ``value``."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in ("precision", "fmr"):
            raise ValueError(f"a target is precision or fmr, got {self.metric!r}")
        if not 0 < self.value < 1:
            raise ValueError(f"target {self.metric} must lie strictly between 0 and 1, got {self.value}")

    @property
    def name(self) -> str:
        return f"precision>={self.value:g}" if self.metric == "precision" else f"fmr<={self.value:g}"

    def met(self, rates: dict) -> bool:
        if self.metric == "precision":
            return rates["tp"] > 0 and rates["precision"] >= self.value
        return rates["fmr"] <= self.value


def rates(tp: int, fp: int, genuine: int, impostors: int) -> dict:
    return {"tp": int(tp), "fp": int(fp), "fn": int(genuine - tp), "tn": int(impostors - fp),
            "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / genuine if genuine else 0.0,
            "fmr": fp / impostors if impostors else 0.0, "fnmr": 1.0 - tp / genuine if genuine else 1.0}


def split_classes(labels, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the fit and held-out halves: classes ordered by SHA-256 of ``seed:label``, first half fit."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    order = sorted(classes.tolist(), key=lambda label: hashlib.sha256(f"{seed}:{label}".encode()).hexdigest())
    fit = set(order[: (len(order) + 1) // 2])
    in_fit = np.array([label in fit for label in labels.tolist()], dtype=bool)
    return in_fit, ~in_fit


# ------------------------------------------------------------------------------------------ cosine
def float_rates_at(pairs: FloatPairs, threshold: float) -> dict:
    return rates(pairs.genuine_at_least(threshold), pairs.impostors_at_least(threshold), len(pairs.genuine),
                 pairs.impostors)


def choose_float(pairs: FloatPairs, target: Target) -> float | None:
    """The lowest cosine threshold (among the genuine scores) meeting ``target``, or None when none does."""
    candidates = np.unique(pairs.genuine)  # ascending: the first that meets the target has the largest recall
    if not len(candidates):
        return None
    tp = len(pairs.genuine) - np.searchsorted(pairs.genuine, candidates, side="left")
    fp = pairs.impostor_at_least[np.searchsorted(pairs.edges, candidates)]
    if target.metric == "precision":
        ok = (tp > 0) & (tp >= target.value * (tp + fp))
    else:
        ok = fp <= target.value * pairs.impostors
    found = np.flatnonzero(ok)
    return float(candidates[found[0]]) if len(found) else None


def float_curve(pairs: FloatPairs) -> dict:
    """Precision, recall, FMR and FNMR at up to CURVE_POINTS thresholds spread over the genuine scores."""
    candidates = np.unique(pairs.genuine)
    chosen = candidates[np.unique(np.linspace(0, len(candidates) - 1, min(CURVE_POINTS, len(candidates)))
                                  .round().astype(int))] if len(candidates) else candidates
    points = [float_rates_at(pairs, float(t)) for t in chosen]
    return {"threshold": [float(t) for t in chosen], **{key: [p[key] for p in points]
                                                          for key in ("precision", "recall", "fmr", "fnmr")}}


# ------------------------------------------------------------------------------------------ Hamming
def hamming_rates_at(pairs: HammingPairs, threshold: int) -> dict:
    tp = int(pairs.genuine[: threshold + 1].sum())
    fp = int(pairs.impostor[: threshold + 1].sum())
    return rates(tp, fp, int(pairs.genuine.sum()), int(pairs.impostor.sum()))


def choose_hamming(pairs: HammingPairs, target: Target) -> int | None:
    """The largest Hamming threshold meeting ``target`` among the genuine pairs' distances (as for cosine: a
    threshold between the farthest genuine pair and the nearest impostor would only add risk), or None."""
    tp, fp = np.cumsum(pairs.genuine), np.cumsum(pairs.impostor)
    if target.metric == "precision":
        ok = (tp > 0) & (tp >= target.value * (tp + fp))
    else:
        ok = fp <= target.value * pairs.impostor.sum()
    found = np.flatnonzero(ok & (pairs.genuine > 0))
    return int(found[-1]) if len(found) else None


def hamming_curve(pairs: HammingPairs) -> dict:
    observed = np.flatnonzero(pairs.genuine)
    chosen = observed[np.unique(np.linspace(0, len(observed) - 1, min(CURVE_POINTS, len(observed)))
                                .round().astype(int))] if len(observed) else observed
    points = [hamming_rates_at(pairs, int(h)) for h in chosen]
    return {"threshold": [int(h) for h in chosen], "bit_agreement": [1 - int(h) / pairs.dim for h in chosen],
            **{key: [p[key] for p in points] for key in ("precision", "recall", "fmr", "fnmr")}}


# ------------------------------------------------------------------------------------------ both halves
def calibrate_thresholds(embeddings, labels, targets=(Target("precision", 0.99),), kinds=("float", "binary"),
                         seed: int = 0) -> dict:
    """Thresholds for each ``target`` and kind, chosen on half of the classes, with their rates on both halves.

    Returns ``{"split": ..., "rule": ..., "kinds": {"float": {"decisions": [...], "curves": ...}, "binary": ...}}``;
    each decision holds the target, the threshold (binary: as a Hamming distance and as bit agreement), and the
    ``fit`` and ``held_out`` rates (``reachable`` is False when no threshold meets the target on the fit half).
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels).reshape(-1)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(f"expected N x D embeddings and N labels, got {embeddings.shape} and {labels.shape}")
    fit, held_out = split_classes(labels, seed)
    for name, mask in (("fit", fit), ("held-out", held_out)):
        if len(np.unique(labels[mask])) < 2 or not _has_genuine(labels[mask]):
            raise ValueError(f"the {name} half of the classes needs at least 2 classes and one class with 2 images; "
                             f"calibration needs more labelled images")
    targets = [target if isinstance(target, Target) else Target(*target) for target in targets]
    result: dict = {"split": {"method": f"classes ordered by SHA-256 of '{seed}:<label>'; the first half fits the "
                                        f"thresholds, the second measures them", "seed": seed,
                              "fit": _counts(labels[fit]), "held_out": _counts(labels[held_out])},
                    "rule": "a pair matches when its cosine is >= the threshold, or its Hamming distance <= the "
                            "threshold (ties match)",
                    "kinds": {}}
    if "float" in kinds:
        result["kinds"]["float"] = _float_decisions(embeddings[fit], labels[fit], embeddings[held_out],
                                                    labels[held_out], targets)
    if "binary" in kinds:
        result["kinds"]["binary"] = _hamming_decisions(embeddings[fit], labels[fit], embeddings[held_out],
                                                       labels[held_out], targets)
    return result


def _has_genuine(labels: np.ndarray) -> bool:
    return bool((np.unique(labels, return_counts=True)[1] > 1).any())


def _counts(labels: np.ndarray) -> dict:
    sizes = np.unique(labels, return_counts=True)[1]
    genuine = int((sizes * (sizes - 1) // 2).sum())
    return {"images": int(len(labels)), "classes": int(len(sizes)), "genuine_pairs": genuine,
            "impostor_pairs": int(len(labels) * (len(labels) - 1) // 2 - genuine)}


def _float_decisions(x_fit, y_fit, x_out, y_out, targets: list[Target]) -> dict:
    fitted = float_pairs(x_fit, y_fit)
    thresholds = [choose_float(fitted, target) for target in targets]
    measured = float_pairs(x_out, y_out, extra_edges=[t for t in thresholds if t is not None])
    decisions = []
    for target, threshold in zip(targets, thresholds, strict=True):
        decision: dict = {"target": target.name, "metric": target.metric, "value": target.value,
                          "reachable": threshold is not None}
        if threshold is not None:
            decision.update(threshold=threshold, fit=float_rates_at(fitted, threshold),
                            held_out=float_rates_at(measured, threshold))
            decision["held_out_met"] = target.met(decision["held_out"])
        decisions.append(decision)
    return {"score": "cosine", "decisions": decisions,
            "curves": {"fit": float_curve(fitted), "held_out": float_curve(measured)}}


def _hamming_decisions(x_fit, y_fit, x_out, y_out, targets: list[Target]) -> dict:
    fitted, measured = hamming_pairs(x_fit, y_fit), hamming_pairs(x_out, y_out)
    dim = fitted.dim
    decisions = []
    for target in targets:
        threshold = choose_hamming(fitted, target)
        decision: dict = {"target": target.name, "metric": target.metric, "value": target.value,
                          "reachable": threshold is not None}
        if threshold is not None:
            decision.update(hamming=threshold, threshold=1 - threshold / dim,
                            fit=hamming_rates_at(fitted, threshold), held_out=hamming_rates_at(measured, threshold))
            decision["held_out_met"] = target.met(decision["held_out"])
        decisions.append(decision)
    return {"score": "bit agreement (1 - Hamming distance / dim); thresholds also as Hamming distances",
            "dim": dim, "decisions": decisions,
            "curves": {"fit": hamming_curve(fitted), "held_out": hamming_curve(measured)}}


def binary_threshold_to_hamming(threshold: float, dim: int) -> int:
    """The largest Hamming distance whose bit agreement 1 - h / dim is at least ``threshold``."""
    return int(math.floor((1.0 - threshold) * dim + 1e-9))


__all__ = ["Target", "calibrate_thresholds", "split_classes", "choose_float", "choose_hamming", "float_rates_at",
           "hamming_rates_at", "rates", "binary_threshold_to_hamming"]

"""Classification metrics over class probabilities, with the worker's decision rule.

A case is positive when the positive class's probability reaches the threshold, else the most
probable other class (as ``inference.pipeline.draft_from_probabilities`` decides). Threshold
metrics (precision, recall, specificity, F1) are positive class against the rest; ROC-AUC and
PR-AUC rank by the positive class's probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

Probabilities = npt.NDArray[np.floating[Any]]
Labels = npt.NDArray[np.integer[Any]]


def decide(probabilities: Probabilities, positive: int, threshold: float) -> Labels:
    """The predicted class of each row, by the worker's rule."""
    others = probabilities.copy()
    others[:, positive] = -np.inf
    predicted: Labels = np.argmax(others, axis=1)
    predicted[probabilities[:, positive] >= threshold] = positive
    return predicted


def threshold_for_recall(
    probabilities: Probabilities,
    targets: Labels,
    positive: int,
    recall: float,
    *,
    confidence: float = 0.0,
) -> float:
    """The highest threshold at which the positive class's recall reaches ``recall``.

    With ``confidence`` (e.g. 0.95) it is the one-sided lower confidence bound of the recall
    (Wilson score interval over the positives) that must reach ``recall``, not the observed
    recall: an operating point that holds on new patients, not only on this sample. Where no
    threshold is good enough, the one that finds every positive. With no positive case, 0.5.
    """
    scores = probabilities[:, positive]
    positives = np.sort(scores[targets == positive])[::-1]
    total = positives.size
    if total == 0:
        return 0.5
    for found in range(1, total + 1):
        if recall_lower_bound(found, total, confidence) >= recall:
            return float(positives[found - 1])
    return float(positives[-1])


def recall_lower_bound(found: int, total: int, confidence: float) -> float:
    """The Wilson lower bound of ``found / total`` at one-sided ``confidence`` (0: the ratio)."""
    share = found / total
    if confidence <= 0:
        return share
    z = NormalDist().inv_cdf(confidence)
    centre = share + z * z / (2 * total)
    spread = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    return (centre - spread) / (1 + z * z / total)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    confusion: list[list[int]]
    roc: tuple[list[float], list[float]]
    pr_points: tuple[list[float], list[float]]


def evaluate(
    probabilities: Probabilities, targets: Labels, *, positive: int, threshold: float
) -> Evaluation:
    """Accuracy, precision, recall, specificity, F1, ROC-AUC, PR-AUC and the confusion matrix
    (rows true class, columns predicted) at ``threshold``."""
    classes = probabilities.shape[1]
    predicted = decide(probabilities, positive, threshold)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    is_positive, said_positive = targets == positive, predicted == positive
    tp = int(np.sum(is_positive & said_positive))
    fp = int(np.sum(~is_positive & said_positive))
    fn = int(np.sum(is_positive & ~said_positive))
    tn = int(np.sum(~is_positive & ~said_positive))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    scores = probabilities[:, positive]
    both = 0 < tp + fn < len(targets)
    metrics: dict[str, Any] = {
        "n": len(targets),
        "threshold": threshold,
        "accuracy": _ratio(int(np.sum(predicted == targets)), len(targets)),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * precision * recall, precision + recall),
        "roc_auc": float(roc_auc_score(is_positive, scores)) if both else None,
        "pr_auc": float(average_precision_score(is_positive, scores)) if both else None,
    }
    roc: tuple[list[float], list[float]] = ([], [])
    pr: tuple[list[float], list[float]] = ([], [])
    if both:
        fpr, tpr, _ = roc_curve(is_positive, scores)
        roc = (fpr.tolist(), tpr.tolist())
        pr = _pr_curve(is_positive, scores)
    return Evaluation(metrics=metrics, confusion=confusion.tolist(), roc=roc, pr_points=pr)


def _pr_curve(
    is_positive: npt.NDArray[np.bool_], scores: Probabilities
) -> tuple[list[float], list[float]]:
    """Recall and precision at every distinct score, highest threshold first."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(is_positive[order])
    ranks = np.arange(1, len(order) + 1)
    return (hits / max(int(is_positive.sum()), 1)).tolist(), (hits / ranks).tolist()


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0

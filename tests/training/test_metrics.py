"""Metrics at the worker's decision rule, and the threshold chosen for a target recall."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import decide, evaluate, recall_lower_bound, threshold_for_recall


def binary(p_positive: list[float]) -> np.ndarray:
    positive = np.asarray(p_positive)
    return np.stack([1 - positive, positive], axis=1)


def test_the_positive_class_wins_at_the_threshold_else_the_most_probable_other():
    probabilities = np.asarray([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.6, 0.1, 0.3]])
    assert decide(probabilities, positive=2, threshold=0.3).tolist() == [2, 2, 2]
    assert decide(probabilities, positive=2, threshold=0.31).tolist() == [0, 1, 0]


def test_the_threshold_is_the_most_specific_that_reaches_the_recall():
    targets = np.asarray([1, 1, 1, 1, 0, 0])
    probabilities = binary([0.9, 0.8, 0.4, 0.2, 0.3, 0.1])
    assert threshold_for_recall(probabilities, targets, 1, recall=0.75) == pytest.approx(0.4)
    assert threshold_for_recall(probabilities, targets, 1, recall=1.0) == pytest.approx(0.2)
    assert threshold_for_recall(probabilities, np.zeros(6, int), 1, recall=0.95) == 0.5


def test_with_confidence_the_threshold_leaves_room_for_sampling_noise():
    rng = np.random.default_rng(0)
    targets = np.asarray([1] * 500 + [0] * 500)
    probabilities = binary(rng.uniform(size=1000).tolist())
    observed = threshold_for_recall(probabilities, targets, 1, recall=0.95)
    cautious = threshold_for_recall(probabilities, targets, 1, recall=0.95, confidence=0.95)
    assert cautious < observed
    positives = probabilities[targets == 1, 1]
    found = int(np.sum(positives >= cautious))
    assert recall_lower_bound(found, 500, 0.95) >= 0.95 > recall_lower_bound(found - 1, 500, 0.95)
    # Too few positives to be confident: every positive is found.
    assert threshold_for_recall(
        binary([0.9, 0.8, 0.1]), np.asarray([1, 1, 0]), 1, 0.95, confidence=0.95
    ) == pytest.approx(0.8)


def test_the_wilson_bound_matches_a_known_value():
    # 95 of 100 at one-sided 95 %: Wilson lower bound 0.9008 (z = 1.6449, worked by hand).
    assert recall_lower_bound(95, 100, 0.95) == pytest.approx(0.9008, abs=1e-4)
    assert recall_lower_bound(95, 100, 0.0) == 0.95


def test_metrics_match_a_hand_count():
    targets = np.asarray([1, 1, 1, 1, 0, 0, 0, 0])
    probabilities = binary([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.05])

    result = evaluate(probabilities, targets, positive=1, threshold=0.5)

    # TP 3, FN 1, FP 1, TN 3
    assert result.confusion == [[3, 1], [1, 3]]
    metrics = result.metrics
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(3 / 4)
    # 16 positive-negative pairs; 0.6 and 0.3 rank below the negative 0.7.
    assert metrics["roc_auc"] == pytest.approx(14 / 16)
    assert 0 < metrics["pr_auc"] <= 1


def test_one_class_only_has_no_auc():
    result = evaluate(binary([0.9, 0.2]), np.asarray([1, 1]), positive=1, threshold=0.5)
    assert result.metrics["roc_auc"] is None
    assert result.metrics["recall"] == 0.5

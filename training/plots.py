"""The PNGs of a run folder: learning curves, confusion matrices, ROC and PR curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt

from training.metrics import Evaluation


def learning_curves(epochs: Sequence[dict[str, Any]], path: Path) -> None:
    """Training and validation loss, and validation ROC-AUC and accuracy, per epoch."""
    x = [entry["epoch"] for entry in epochs]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train")
    losses.plot(x, [e["val_loss"] for e in epochs], marker="o", label="validation")
    losses.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    losses.legend()
    for key in ("val_roc_auc", "val_accuracy"):
        values = [e[key] if e[key] is not None else float("nan") for e in epochs]
        scores.plot(x, values, marker="o", label=key.removeprefix("val_"))
    scores.set(xlabel="epoch", title="Validation", ylim=(0, 1.02))
    scores.legend()
    _save(figure, path)


def confusion_matrix(
    evaluation: Evaluation, classes: Sequence[str], title: str, path: Path
) -> None:
    matrix = evaluation.confusion
    figure, axes = plt.subplots(figsize=(1.6 * len(classes) + 2.5, 1.4 * len(classes) + 1.8))
    axes.imshow(matrix, cmap="Blues")
    high = max(max(row) for row in matrix) or 1
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            colour = "white" if value > high / 2 else "black"
            axes.text(column, row, str(value), ha="center", va="center", color=colour)
    axes.set_xticks(range(len(classes)), classes, rotation=20, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    threshold = evaluation.metrics["threshold"]
    axes.set(xlabel="predicted", ylabel="true", title=f"{title} (threshold {threshold:.3f})")
    _save(figure, path)


def roc_pr_curves(evaluations: dict[str, Evaluation], path: Path) -> None:
    """ROC and precision-recall curves of each named evaluation (e.g. val, test)."""
    figure, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, evaluation in evaluations.items():
        auc, ap = evaluation.metrics["roc_auc"], evaluation.metrics["pr_auc"]
        if auc is None:
            continue
        roc.plot(*evaluation.roc, label=f"{name} AUC {auc:.3f}")
        pr.plot(*evaluation.pr_points, label=f"{name} AP {ap:.3f}")
    roc.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    roc.legend(loc="lower right")
    pr.legend(loc="lower left")
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""Scoring a model on a labelled set: metrics.json, report.txt, confusion matrices, ROC/PR
curves, and (for ``manage.py evaluate``) one row per sample in predictions.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from inference.models import ModelVersion
from inference.preprocessing import PreprocessSpec
from training import plots
from training.datasets import LabelledSet, SampleDataset
from training.metrics import Evaluation, decide, evaluate

NOT_FOR_DIAGNOSTIC_USE = "Research and evaluation only. AI result, not for diagnostic use."


def write_evaluation(results: dict[str, Evaluation], classes: list[str], out: Path) -> None:
    """metrics.json, report.txt, a confusion matrix per part and the ROC/PR curves."""
    for side, result in results.items():
        plots.confusion_matrix(result, classes, side, out / f"confusion_{side}.png")
    plots.roc_pr_curves(results, out / "roc_pr.png")
    write_json(
        out / "metrics.json",
        {
            side: {**r.metrics, "classes": classes, "confusion": r.confusion}
            for side, r in results.items()
        },
    )
    (out / "report.txt").write_text(
        "\n\n".join(classification_report(r, classes, side) for side, r in results.items()) + "\n",
        encoding="utf-8",
    )


def evaluate_model(
    model_version: ModelVersion,
    dataset: LabelledSet,
    out: Path,
    *,
    threshold: float | None = None,
    batch_size: int = 32,
) -> Evaluation:
    """Run the registered model on ``dataset`` as the worker does (its ONNX file, through
    :class:`inference.pipeline.Ensemble`); the files of :func:`write_evaluation` and
    ``predictions.csv`` (one row per sample) in ``out``."""
    from inference.pipeline import Ensemble

    ensemble = Ensemble(members=[model_version], runner="onnx")
    spec = PreprocessSpec.from_dict(model_version.preprocessing)
    classes = list(model_version.class_labels)
    data = SampleDataset(dataset.samples, classes, spec)
    parts = []
    for start in tqdm(range(0, len(data), batch_size), desc="evaluate", unit="batch"):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        metadata = np.stack([item[1].numpy() for item in items]) if spec.metadata else None
        parts.append(
            ensemble.probabilities(np.stack([item[0].numpy() for item in items]), metadata)
        )
    probabilities = np.concatenate(parts)
    targets = np.asarray(data.targets())
    positive = classes.index(model_version.positive_label)
    chosen = model_version.threshold if threshold is None else threshold
    result = evaluate(probabilities, targets, positive=positive, threshold=chosen)
    out.mkdir(parents=True, exist_ok=True)
    write_evaluation({"evaluation": result}, classes, out)
    predicted = decide(probabilities, positive, chosen)
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        rows = csv.writer(handle)
        rows.writerow(["key", "label", "predicted", f"p_{model_version.positive_label}"])
        for sample, label, p in zip(dataset.samples, predicted, probabilities, strict=True):
            rows.writerow([sample.key, sample.label, classes[label], f"{p[positive]:.6f}"])
    return result


def classification_report(result: Evaluation, classes: list[str], title: str) -> str:
    """Per-class precision, recall, F1 and support, then the summary metrics."""
    matrix = np.asarray(result.confusion)
    lines = [
        f"{title}: {NOT_FOR_DIAGNOSTIC_USE}",
        f"{'class':<32}precision  recall      f1  support",
    ]
    for index, label in enumerate(classes):
        tp = matrix[index, index]
        precision = tp / matrix[:, index].sum() if matrix[:, index].sum() else 0.0
        recall = tp / matrix[index].sum() if matrix[index].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        lines.append(f"{label:<32}{precision:9.3f}{recall:8.3f}{f1:8.3f}{matrix[index].sum():9d}")
    lines.append("")
    lines += [
        f"{key:<12}{value:.4f}" if isinstance(value, float) else f"{key:<12}{value}"
        for key, value in result.metrics.items()
    ]
    lines.append("confusion (rows true, columns predicted): " + json.dumps(result.confusion))
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")

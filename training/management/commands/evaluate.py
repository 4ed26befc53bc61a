"""``manage.py evaluate MODEL DATASET...``: a registered model's metrics on any labelled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.models import ModelVersion
from training.datasets import DatasetError, load
from training.evaluation import evaluate_model


class Command(BaseCommand):
    help = (
        "Run a registered model (its ONNX file, as the worker does) on a labelled dataset and "
        "write its metrics, classification report, confusion matrix and ROC/PR curves at the "
        "model's own threshold. MODEL is NAME:VERSION or the model version's id."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model")
        parser.add_argument("dataset", nargs="*", type=Path, help="Folder, RSNA root or CSVs.")
        parser.add_argument("--from-reviews", action="store_true", help="Reviewed results.")
        parser.add_argument("--output", type=Path, help="Where the files go.")
        parser.add_argument("--threshold", type=float, help="Instead of the model's own.")

    def handle(self, *args: Any, **options: Any) -> None:
        model_version = _model_version(options["model"])
        output = options["output"] or Path(settings.PACS_AI_DATA_DIR) / "evaluations" / (
            f"{model_version.name}-{model_version.version}"
        )
        try:
            dataset = load(
                options["dataset"], task=model_version.task, from_reviews=options["from_reviews"]
            )
            unknown = sorted({s.label for s in dataset.samples} - set(model_version.class_labels))
            if unknown:
                raise DatasetError(
                    f"labels {unknown} are not the model's classes {model_version.class_labels}"
                )
            result = evaluate_model(model_version, dataset, output, threshold=options["threshold"])
        except (DatasetError, ValueError) as error:
            raise CommandError(str(error)) from error
        self.stdout.write(f"{dataset.source}: {len(dataset.samples)} samples {dataset.counts}")
        self.stdout.write(json.dumps(result.metrics, indent=2))
        self.stdout.write(f"confusion (rows true, columns predicted): {result.confusion}")
        self.stdout.write(f"Written to {output}")


def _model_version(value: str) -> ModelVersion:
    name, _, version = value.partition(":")
    found = (
        ModelVersion.objects.filter(pk=int(value)).first()
        if value.isdigit()
        else ModelVersion.objects.filter(name=name, version=version).first()
    )
    if found is None:
        raise CommandError(f"No model version {value!r}: give NAME:VERSION or an id.")
    return found

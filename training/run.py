"""A training run from dataset to registered candidate, and the evaluation of a model on a set.

Run folder::

    split.csv            key, label, split: pass it back with --split-file to reuse the split
    dataset.json         source, classes, counts per split and class
    epochs.csv/.jsonl    one row per epoch
    tensorboard/         where tensorboard is installed
    last.pt / best.pt    full checkpoint (resume) / best weights by validation ROC-AUC
    learning_curves.png, confusion_val.png, confusion_test.png, roc_pr.png
    report.txt, metrics.json
    model.onnx, model.pt, model_card.json   what is registered
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from django.utils import timezone
from torch.utils.data import DataLoader
from tqdm import tqdm

from inference.models import Task
from inference.networks import build_model, export_onnx, onnx_max_abs_diff
from inference.preprocessing import METADATA_FEATURES, PreprocessSpec
from inference.services import model_version_register, sha256_of
from training import engine, plots
from training.datasets import (
    SPLITS,
    DatasetError,
    LabelledSet,
    Sample,
    SampleDataset,
    split_read,
    split_write,
    stratified_split,
)
from training.evaluation import NOT_FOR_DIAGNOSTIC_USE, write_evaluation, write_json
from training.metrics import Evaluation, evaluate, threshold_for_recall
from training.models import TrainingRun

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
DEFAULT_POSITIVES = {Task.CXR2D: ("PNEUMONIA", "Lung Opacity"), Task.CT3D: ("pathology",)}


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why (the TrainingRun row records it)."""


@dataclass
class RunOptions:
    task: str
    name: str
    version: str
    architecture: str
    output: Path
    spec: PreprocessSpec
    fit: engine.FitConfig = field(default_factory=engine.FitConfig)
    positive: str | None = None
    seed: int = 42
    split_file: Path | None = None
    target_recall: float = 0.95
    recall_confidence: float = 0.95
    pretrained: Path | None = None
    resume: Path | None = None
    cache: bool = False
    letterbox_aspect: float = 1.0
    device: str = "auto"
    register: bool = True


def class_order(labels: Sequence[str], task: str, positive: str | None) -> tuple[list[str], str]:
    """The network's output order, negatives first (sorted) and the positive class last."""
    present = sorted(set(labels))
    if positive is None:
        positive = next((p for p in DEFAULT_POSITIVES[Task(task)] if p in present), None)
        if positive is None:
            raise DatasetError(f"name the positive class with --positive; classes: {present}")
    if positive not in present:
        raise DatasetError(f"positive class {positive!r} is not among {present}")
    return [label for label in present if label != positive] + [positive], positive


def train(dataset: LabelledSet, options: RunOptions) -> TrainingRun:
    """Train, test, export, check ONNX parity and register a candidate; see the module doc."""
    classes, positive = class_order(
        [s.label for s in dataset.samples], options.task, options.positive
    )
    out = options.output
    out.mkdir(parents=True, exist_ok=True)
    # A resumed run keeps the split it was trained on: a new one could test on training images.
    resumed_split = options.resume.parent / "split.csv" if options.resume else None
    split_file = options.split_file or (
        resumed_split if resumed_split and resumed_split.is_file() else None
    )
    if split_file:
        split = split_read(dataset.samples, split_file)
        split_method = (
            json.loads((split_file.parent / "dataset.json").read_text(encoding="utf-8"))["split"]
            if split_file == resumed_split
            else f"split file {split_file}"
        )
    else:
        split = stratified_split(dataset.samples, seed=options.seed)
        split_method = f"stratified 70/15/15 by patient group, seed {options.seed}"
    split_write(split, out / "split.csv")
    summary = {
        "source": dataset.source,
        "classes": classes,
        "positive": positive,
        "split": split_method,
        "counts": {side: _counts(split[side], classes) for side in SPLITS},
    }
    write_json(out / "dataset.json", summary)
    config = {**asdict(options), "spec": options.spec.to_dict()}
    run = TrainingRun.objects.create(
        name=options.name,
        version=options.version,
        task=options.task,
        architecture=options.architecture,
        run_dir=str(out.resolve()),
        dataset=summary,
        config=json.loads(json.dumps(config, default=str)),
    )
    try:
        _train(run, split, classes, positive, options)
    except BaseException as error:
        run.status = TrainingRun.Status.FAILED
        run.error = f"{type(error).__name__}: {error}"
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "error", "finished_at"])
        raise
    return run


def _train(
    run: TrainingRun,
    split: dict[str, list[Sample]],
    classes: list[str],
    positive: str,
    options: RunOptions,
) -> None:
    out, fit = options.output, options.fit
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if options.device == "auto"
        else options.device
    )
    generator = engine.seed_everything(options.seed)
    data = {
        side: SampleDataset(split[side], classes, options.spec, cache=options.cache)
        for side in SPLITS
    }
    targets = data["train"].targets()
    augmented = engine.Augmented(
        data["train"], engine.augmentation(options.spec, letterbox_aspect=options.letterbox_aspect)
    )
    loader = engine.train_loader(augmented, targets, len(classes), fit, generator)
    evaluation_loaders = {
        side: DataLoader(data[side], batch_size=fit.batch_size, num_workers=fit.workers)
        for side in ("val", "test")
    }
    metadata = options.spec.metadata
    model = build_model(options.architecture, len(classes), metadata=metadata)
    if options.pretrained:
        skipped = engine.load_pretrained(model, options.pretrained)
        logger.info("pretrained weights loaded; not taken: %s", ", ".join(skipped) or "none")
    weights = engine.class_weights(targets, len(classes)) if fit.balance == "weights" else None
    trainer = engine.Trainer(model, fit, device, len(loader), weights)
    start = trainer.resume(options.resume) + 1 if options.resume else 1
    writer = _tensorboard(out / "tensorboard")
    positive_index = classes.index(positive)
    epochs = tqdm(range(start, fit.epochs + 1), desc="training", unit="epoch")
    for epoch in epochs:
        began = time.monotonic()
        train_loss = trainer.train_epoch(loader, epoch)
        probabilities, val_targets, val_loss = engine.predict(
            trainer.model, evaluation_loaders["val"], device, trainer.precision
        )
        val = evaluate(probabilities, val_targets, positive=positive_index, threshold=0.5).metrics
        entry = {
            "epoch": epoch,
            "lr": trainer.scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{key}": val[key] for key in _EPOCH_METRICS},
            "seconds": round(time.monotonic() - began, 1),
        }
        score = val["roc_auc"] if val["roc_auc"] is not None else -val_loss
        if trainer.record(entry, score):
            torch.save(trainer.model.state_dict(), out / "best.pt")
        trainer.checkpoint(out / "last.pt")
        _epoch_write(out, entry, writer)
        epochs.set_postfix(val_auc=val["roc_auc"], val_loss=round(val_loss, 4))
        run.epochs_done, run.best_epoch = epoch, trainer.history.best_epoch
        run.metrics = {"last_epoch": entry}
        run.save(update_fields=["epochs_done", "best_epoch", "metrics"])
        if trainer.history.stale >= fit.patience:
            logger.info("early stop: no better validation score for %d epochs", fit.patience)
            break
    if writer is not None:
        writer.close()
    plots.learning_curves(trainer.history.epochs, out / "learning_curves.png")

    # The best epoch's weights, in full precision on the CPU: exactly what is exported.
    model = build_model(options.architecture, len(classes), metadata=metadata)
    model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
    cpu = torch.device("cpu")
    val_probabilities, val_targets, _ = engine.predict(model, evaluation_loaders["val"], cpu)
    threshold = threshold_for_recall(
        val_probabilities,
        val_targets,
        positive_index,
        options.target_recall,
        confidence=options.recall_confidence,
    )
    results = {
        "val": evaluate(
            val_probabilities, val_targets, positive=positive_index, threshold=threshold
        ),
        "test": evaluate(
            *engine.predict(model, evaluation_loaders["test"], cpu)[:2],
            positive=positive_index,
            threshold=threshold,
        ),
    }
    write_evaluation(results, classes, out)
    parity = _export(model, data["test"], out, options.architecture)
    card = _model_card(run, options, classes, positive, threshold, results, parity, trainer)
    write_json(out / "model_card.json", card)
    metrics = {side: {**r.metrics, "confusion": r.confusion} for side, r in results.items()}
    if options.register:
        run.model_version = model_version_register(
            name=options.name,
            version=options.version,
            task=options.task,
            architecture=options.architecture,
            class_labels=classes,
            positive_label=positive,
            threshold=threshold,
            preprocessing=options.spec.to_dict(),
            onnx_file=out / "model.onnx",
            weights_file=out / "model.pt",
            metrics=metrics,
            model_card=card,
        )
    run.metrics = {**run.metrics, **metrics, "onnx_parity_max_abs_diff": parity}
    run.status = TrainingRun.Status.SUCCEEDED
    run.finished_at = timezone.now()
    run.save()


_EPOCH_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def _export(model: torch.nn.Module, test: SampleDataset, out: Path, architecture: str) -> float:
    """model.pt and model.onnx; the ONNX logits must match torch's within the tolerance."""
    torch.save(model.state_dict(), out / "model.pt")
    items = [test[i] for i in range(min(len(test), 4))]
    example = torch.stack([item[0] for item in items])
    metadata = torch.stack([item[1] for item in items]) if test.spec.metadata else None
    export_onnx(model, example, out / "model.onnx", metadata=metadata)
    difference = onnx_max_abs_diff(model, out / "model.onnx", example, metadata=metadata)
    logger.info("ONNX parity: max abs diff of logits %.3g", difference)
    if not difference <= PARITY_TOLERANCE:
        raise TrainingError(
            f"ONNX export of {architecture} differs from torch by {difference:.3g} "
            f"(> {PARITY_TOLERANCE:g}); not registered"
        )
    return difference


def _model_card(
    run: TrainingRun,
    options: RunOptions,
    classes: list[str],
    positive: str,
    threshold: float,
    results: dict[str, Evaluation],
    parity: float,
    trainer: engine.Trainer,
) -> dict[str, Any]:
    out = options.output
    return {
        "name": options.name,
        "version": options.version,
        "task": options.task,
        "architecture": options.architecture,
        "classes": classes,
        "positive_label": positive,
        "intended_use": NOT_FOR_DIAGNOSTIC_USE,
        "limitations": (
            "Trained and tested on the data below only; performance on other populations, "
            "devices and protocols is unknown until measured with manage.py evaluate."
        ),
        "data": run.dataset,
        "preprocessing": options.spec.to_dict(),
        "threshold": {
            "value": threshold,
            "chosen": (
                f"highest threshold whose validation recall reaches {options.target_recall}"
                + (
                    f" with {options.recall_confidence:.0%} confidence (one-sided Wilson lower "
                    "bound)"
                    if options.recall_confidence > 0
                    else ""
                )
            ),
        },
        "metrics": {side: {**r.metrics, "confusion": r.confusion} for side, r in results.items()},
        "training": {
            "epochs_run": len(trainer.history.epochs),
            "best_epoch": trainer.history.best_epoch,
            "selected_by": "validation ROC-AUC",
            "optimizer": "AdamW, linear warm-up then cosine decay",
            "precision": trainer.precision,
            "metadata_fusion": (
                f"PatientAge, PatientSex, ViewPosition ({', '.join(METADATA_FEATURES)})"
                if options.spec.metadata
                else "none"
            ),
            "augmentation": "random resized crop, random affine"
            + (
                f", random letterbox up to {options.letterbox_aspect}:1"
                if options.letterbox_aspect > 1
                else ""
            ),
            "pretrained": str(options.pretrained) if options.pretrained else "none (from scratch)",
            "config": asdict(options.fit),
            "seed": options.seed,
            "torch": torch.__version__,
            "host": platform.machine(),
        },
        "onnx_parity_max_abs_diff": parity,
        "files": {
            "onnx_sha256": sha256_of(out / "model.onnx"),
            "weights_sha256": sha256_of(out / "model.pt"),
        },
    }


def _counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    return {label: sum(1 for s in samples if s.label == label) for label in classes}


def _epoch_write(out: Path, entry: dict[str, Any], writer: Any) -> None:
    with (out / "epochs.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    path = out / "epochs.csv"
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        rows = csv.DictWriter(handle, fieldnames=list(entry))
        if new:
            rows.writeheader()
        rows.writerow(entry)
    if writer is not None:
        for key, value in entry.items():
            if key != "epoch" and value is not None:
                writer.add_scalar(key, value, entry["epoch"])


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))

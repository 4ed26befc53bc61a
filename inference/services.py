"""Writes for the inference app: the model registry, routing complete series to jobs, and
keeping jobs moving (a lost queue message is re-created from the rows)."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from inference.models import (
    AuditEvent,
    InferenceJob,
    ModelVersion,
    Prediction,
    Review,
    RoutingRule,
)
from inference.selectors import active_models, routing_rule_for_series
from studies.models import Series
from studies.storage import sanitise_uid, storage_root

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

RUN_INFERENCE_TASK = "worker.tasks.run_inference"
# Models trained by this project and kept in the repository: a folder each, holding
# model.onnx, model.pt and the model_card.json that ``manage.py train`` wrote for them.
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "shipped_models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def models_root() -> Path:
    return Path(settings.INFERENCE_MODELS_DIR)


def model_version_register(
    *,
    name: str,
    version: str,
    task: str,
    architecture: str,
    class_labels: list[str],
    positive_label: str,
    threshold: float,
    preprocessing: dict[str, Any],
    onnx_file: Path,
    weights_file: Path,
    metrics: dict[str, Any] | None = None,
    model_card: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record a model as a candidate and copy its files into the registry.

    The row comes first, in the same transaction as the copy: a duplicate name and version is
    refused before any file is touched, and each version gets a folder of its own (its id).
    """
    if positive_label not in class_labels:
        raise ValueError(f"positive label {positive_label!r} is not one of {class_labels}")
    card = {
        "intended_use": "Research and evaluation. Not for diagnostic use.",
        **(model_card or {}),
    }
    with transaction.atomic():
        model = ModelVersion.objects.create(
            name=name,
            version=version,
            task=task,
            architecture=architecture,
            class_labels=class_labels,
            positive_label=positive_label,
            threshold=threshold,
            preprocessing=preprocessing,
            onnx_sha256=sha256_of(onnx_file),
            weights_sha256=sha256_of(weights_file),
            metrics=metrics or {},
            model_card=card,
        )
        folder = Path(f"{model.pk:05d}-{_safe_name(name)}-{_safe_name(version)}")
        # A folder left by a registration that rolled back may hold this id: it is ours.
        (models_root() / folder).mkdir(parents=True, exist_ok=True)
        model.onnx_path = str(folder / "model.onnx")
        model.weights_path = str(folder / "model.pt")
        shutil.copyfile(onnx_file, models_root() / model.onnx_path)
        shutil.copyfile(weights_file, models_root() / model.weights_path)
        model.save(update_fields=["onnx_path", "weights_path"])
    return model


def model_version_activate(*, model_version: ModelVersion, ensemble: bool = False) -> ModelVersion:
    """Make a version active for its task; others of the task retire unless ``ensemble``."""
    with transaction.atomic():
        if not ensemble:
            ModelVersion.objects.filter(
                task=model_version.task, status=ModelVersion.Status.ACTIVE
            ).exclude(pk=model_version.pk).update(status=ModelVersion.Status.RETIRED)
        model_version.status = ModelVersion.Status.ACTIVE
        model_version.activated_at = timezone.now()
        model_version.save(update_fields=["status", "activated_at"])
    logger.info(
        "model %s %s active for %s", model_version.name, model_version.version, model_version.task
    )
    return model_version


class ShippedModelError(RuntimeError):
    """A shipped model's files do not match its card."""


def shipped_models_install(*, root: Path = SHIPPED_MODELS_DIR) -> list[tuple[ModelVersion, str]]:
    """Register the models shipped in ``root``; activate each where its task has none active.

    Idempotent: a version registered before is left as it is, and one an administrator retired
    stays retired. Each file's sha256 must match the card before anything is registered.
    Returns each model with what happened to it: "registered", "activated" or "present".
    """
    outcome = []
    for card_path in sorted(root.glob("*/model_card.json")):
        folder = card_path.parent
        card = json.loads(card_path.read_text(encoding="utf-8"))
        files = {"onnx_sha256": folder / "model.onnx", "weights_sha256": folder / "model.pt"}
        for key, path in files.items():
            if sha256_of(path) != card["files"][key]:
                raise ShippedModelError(f"{path} does not match the sha256 in {card_path}")
        model = ModelVersion.objects.filter(name=card["name"], version=card["version"]).first()
        action = "present"
        if model is None:
            model = model_version_register(
                name=card["name"],
                version=card["version"],
                task=card["task"],
                architecture=card["architecture"],
                class_labels=card["classes"],
                positive_label=card["positive_label"],
                threshold=card["threshold"]["value"],
                preprocessing=card["preprocessing"],
                onnx_file=files["onnx_sha256"],
                weights_file=files["weights_sha256"],
                metrics=card["metrics"],
                model_card=card,
            )
            action = "registered"
        if (
            model.status == ModelVersion.Status.CANDIDATE
            and not active_models(task=model.task).exists()
        ):
            model_version_activate(model_version=model)
            action = "activated"
        outcome.append((model, action))
    return outcome


def series_route(*, series: Series) -> InferenceJob | None:
    """Create (and queue on commit) the job for a complete series, if a routing rule matches."""
    rule = routing_rule_for_series(series=series)
    if rule is None:
        logger.info("series %s (%s): no routing rule matches", series.pk, series.modality)
        return None
    return job_create(series=series, task=rule.task, mode=rule.mode, routing_rule=rule)


def job_create(
    *,
    series: Series,
    task: str,
    mode: str,
    routing_rule: RoutingRule | None = None,
    requested_model: ModelVersion | None = None,
) -> InferenceJob:
    job = InferenceJob.objects.create(
        series=series,
        series_revision=series.revision,
        task=task,
        mode=mode,
        routing_rule=routing_rule,
        requested_model=requested_model,
        queued_at=timezone.now(),
    )
    transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def job_requeue(*, job: InferenceJob) -> bool:
    """Queue a failed job again (admin and API); False if it was not failed."""
    requeued = InferenceJob.objects.filter(pk=job.pk, status=InferenceJob.Status.FAILED).update(
        status=InferenceJob.Status.QUEUED, error="", queued_at=timezone.now(), attempts=0
    )
    if requeued:
        transaction.on_commit(lambda: _enqueue(job.pk))
    return requeued == 1


def jobs_recover(*, now: dt.datetime | None = None) -> list[int]:
    """Re-send jobs whose queue message was lost: queued too long, or running on a dead worker.

    A job counts as running on a dead worker once it has run longer than the hard time limit
    plus INFERENCE_RECOVER_GRACE seconds; after INFERENCE_MAX_ATTEMPTS such losses it is failed
    rather than sent again, so a job that kills its worker (out of memory, say) cannot do so
    forever. Each job is taken with a conditional UPDATE, so two sweepers never both act on it.
    """
    now = now or timezone.now()
    stale_queue = now - dt.timedelta(seconds=settings.INFERENCE_REQUEUE_AFTER)
    stale_run = now - dt.timedelta(
        seconds=settings.INFERENCE_HARD_TIME_LIMIT + settings.INFERENCE_RECOVER_GRACE
    )
    stuck = Q(status=InferenceJob.Status.QUEUED, queued_at__lt=stale_queue) | Q(
        status=InferenceJob.Status.RUNNING, started_at__lt=stale_run
    )
    recovered = []
    for pk, status, queued_at, started_at, attempts in InferenceJob.objects.filter(
        stuck
    ).values_list("pk", "status", "queued_at", "started_at", "attempts"):
        same = InferenceJob.objects.filter(
            pk=pk, status=status, queued_at=queued_at, started_at=started_at
        )
        if status == InferenceJob.Status.RUNNING and attempts >= settings.INFERENCE_MAX_ATTEMPTS:
            same.update(
                status=InferenceJob.Status.FAILED,
                finished_at=now,
                error=f"The worker was lost {attempts} times running this job (killed, out of "
                "memory, or past the hard time limit).",
            )
            continue
        if same.update(status=InferenceJob.Status.QUEUED, queued_at=now):
            recovered.append(pk)
            transaction.on_commit(lambda pk=pk: _enqueue(pk))  # type: ignore[misc]
    if recovered:
        logger.warning("re-sent jobs whose queue message was lost: %s", recovered)
    return recovered


def job_claim(*, job_id: int) -> InferenceJob | None:
    """Take a queued job for this worker; None if another delivery already took it."""
    claimed = InferenceJob.objects.filter(pk=job_id, status=InferenceJob.Status.QUEUED).update(
        status=InferenceJob.Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1
    )
    return InferenceJob.objects.get(pk=job_id) if claimed else None


def _enqueue(job_id: int) -> None:
    current_app.send_task(RUN_INFERENCE_TASK, args=[job_id], queue="inference")


def _safe_name(value: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in value).strip(".")
    if not cleaned:
        raise ValueError(f"{value!r} cannot name a folder")
    return cleaned


def audit_record(
    *,
    user: Any,
    action: str,
    object_type: str,
    object_id: object,
    patient_id: int | None,
    path: str = "",
) -> AuditEvent:
    """Record that ``user`` did ``action`` (e.g. "view", "export") on a patient's AI results."""
    return AuditEvent.objects.create(
        user=user if getattr(user, "is_authenticated", False) else None,
        action=action,
        object_type=object_type,
        object_id=str(object_id)[:64],
        patient_id=patient_id,
        path=path[:255],
    )


def audit_record_many(
    *,
    user: Any,
    action: str,
    object_type: str,
    objects: Iterable[tuple[object, int | None]],
    path: str = "",
) -> list[AuditEvent]:
    """Record, in one insert, that ``user`` did ``action`` on each ``(object_id, patient_id)``.

    What a list page shows is recorded row by row, as :func:`audit_record` records one.
    """
    actor = user if getattr(user, "is_authenticated", False) else None
    return AuditEvent.objects.bulk_create(
        AuditEvent(
            user=actor,
            action=action,
            object_type=object_type,
            object_id=str(object_id)[:64],
            patient_id=patient_id,
            path=path[:255],
        )
        for object_id, patient_id in objects
    )


def prediction_class_labels(*, prediction: Prediction) -> list[str]:
    """The class labels of the model (or ensemble) that made ``prediction``, as it recorded them."""
    return list(prediction.probabilities)


def review_create(
    *,
    prediction: Prediction,
    reviewer: User,
    verdict: str,
    corrected_label: str = "",
    comment: str = "",
) -> Review:
    """Record a radiologist's verdict on an analysed prediction; the newest review counts.

    Raises ValidationError, writing nothing, when the prediction was not analysed, the verdict
    is unknown, a corrected label is missing, is not one of the model's class labels or is the
    AI's own label (that is "agree"), a label is given with agree/disagree, or "disagree" is
    given on a model with more than two classes (where the right class must be named).
    """
    if prediction.status != Prediction.Status.ANALYSED:
        raise ValidationError("Only analysed results can be reviewed.", code="not_analysed")
    if verdict not in Review.Verdict.values:
        raise ValidationError(f"Unknown verdict {verdict!r}.", code="verdict")
    labels = prediction_class_labels(prediction=prediction)
    if verdict == Review.Verdict.CORRECTED:
        if corrected_label not in labels:
            raise ValidationError(
                f"The corrected label must be one of the model's labels: {', '.join(labels)}.",
                code="corrected_label",
            )
        if corrected_label == prediction.label:
            raise ValidationError(
                f"{corrected_label} is the AI's label: choose agree.", code="corrected_label"
            )
    elif corrected_label:
        raise ValidationError(
            "A corrected label goes with the verdict 'corrected label' only.",
            code="corrected_label",
        )
    if verdict == Review.Verdict.DISAGREE and len(labels) != 2:
        raise ValidationError(
            "This model has more than two classes: give the corrected label.", code="disagree"
        )
    return Review.objects.create(
        prediction=prediction,
        reviewer=reviewer,
        verdict=verdict,
        corrected_label=corrected_label,
        comment=comment,
    )


def review_final_label(*, review: Review) -> str:
    """The label a review settles on: the AI's label if agreed, the other class of a binary
    model if disagreed, else the corrected label."""
    prediction = review.prediction
    if review.verdict == Review.Verdict.AGREE:
        return prediction.label
    if review.verdict == Review.Verdict.CORRECTED:
        return review.corrected_label
    others = [
        label
        for label in prediction_class_labels(prediction=prediction)
        if label != prediction.label
    ]
    if len(others) != 1:
        raise ValueError(
            f"review {review.pk}: 'disagree' names no label on {len(others) + 1} classes"
        )
    return others[0]


TRAINING_SET_COLUMNS = [
    "path",
    "label",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "reviewer",
    "reviewed_at",
]


@dataclass(frozen=True)
class TrainingSetExport:
    """Where an export went and what it holds: sample count per final label."""

    folder: Path
    task: str
    counts: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def latest_reviews(*, predictions: QuerySet[Prediction]) -> list[Review]:
    """The newest review of each image or series among the analysed ``predictions``.

    Where several reviewed predictions cover the same image (or, for series-level results,
    the same series), the newest review among them decides. Ordered by prediction id.
    """
    latest: dict[tuple[str, int], Review] = {}
    for review in (
        Review.objects.filter(
            prediction__in=predictions, prediction__status=Prediction.Status.ANALYSED
        )
        .select_related("prediction__job", "prediction__series__study", "prediction__instance")
        .select_related("reviewer")
        .order_by("created_at", "pk")
    ):
        prediction = review.prediction
        sample = (
            ("instance", prediction.instance_id)
            if prediction.instance_id is not None
            else ("series", prediction.series_id)
        )
        latest[sample] = review
    return sorted(latest.values(), key=lambda review: review.prediction_id)


def reviewed_training_set_export(
    *,
    predictions: QuerySet[Prediction],
    exported_by: Any,
    destination: Path | None = None,
) -> TrainingSetExport:
    """Write the reviewed ones among ``predictions`` as a labelled training set of one task.

    Layout of ``destination`` (default ``$PACS_AI_DATA_DIR/training-sets/reviewed-<UTC time>``),
    a folder per class, as in the folder-per-class image sets that ``training`` reads::

        labels.csv
        <LABEL>/<SOPInstanceUID>.dcm                   an image-level result (radiograph, CT slice)
        <LABEL>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm  a series-level result (a CT volume)

    ``labels.csv`` (UTF-8, header row, comma-separated) has one row per sample with the columns
    ``path`` (relative to the CSV's folder, "/"-separated: the file, or the series folder for a
    series-level result, whose ``sop_instance_uid`` is then empty), ``label`` (the final label),
    ``study_uid``, ``series_uid``, ``sop_instance_uid``, ``reviewer`` (user name) and
    ``reviewed_at`` (ISO 8601, UTC). ``<LABEL>`` is the label with characters other than
    letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``.

    The final label is the newest review's (see :func:`review_final_label`); where several
    reviewed predictions cover the same image or series, the newest review among them decides.
    DICOM files are copied as stored. The folder appears complete or not at all (it is written
    under a ``.part`` name and renamed); it must not exist yet. Each exported prediction gets an
    "export" audit event. Raises ValueError, writing nothing, when no prediction is reviewed or
    the reviewed ones come from more than one task.
    """
    latest = latest_reviews(predictions=predictions)
    if not latest:
        raise ValueError("None of the selected results has been reviewed.")
    tasks = sorted({review.prediction.job.task for review in latest})
    if len(tasks) > 1:
        raise ValueError(f"Export one task at a time: the reviewed results are {', '.join(tasks)}.")

    folder = destination or Path(settings.PACS_AI_DATA_DIR) / "training-sets" / (
        timezone.now().strftime("reviewed-%Y%m%dT%H%M%S%fZ")
    )
    if folder.exists():
        raise ValueError(f"{folder} exists already.")
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)  # left by an export that died half-way
    part.mkdir(parents=True)
    try:
        counts = _training_set_write(part, latest)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    part.rename(folder)
    audit_record_many(
        user=exported_by,
        action="export",
        object_type="prediction",
        objects=(
            (review.prediction_id, review.prediction.series.study.patient_id) for review in latest
        ),
        path=str(folder)[-255:],
    )
    logger.info("exported %d reviewed results to %s", sum(counts.values()), folder)
    return TrainingSetExport(folder=folder, task=tasks[0], counts=counts)


def _training_set_write(folder: Path, reviews: list[Review]) -> dict[str, int]:
    """Write ``labels.csv`` and each review's sample into ``folder``; the count per label."""
    counts: dict[str, int] = {}
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRAINING_SET_COLUMNS)
        writer.writeheader()
        for review in reviews:
            label = review_final_label(review=review)
            writer.writerow(
                {
                    **_training_sample_write(review.prediction, folder / _safe_name(label), folder),
                    "label": label,
                    "reviewer": review.reviewer.get_username(),
                    "reviewed_at": review.created_at.astimezone(dt.UTC).isoformat(),
                }
            )
            counts[label] = counts.get(label, 0) + 1
    return counts


def _training_sample_write(
    prediction: Prediction, class_folder: Path, root: Path
) -> dict[str, str]:
    """Copy one sample's DICOM file(s) into ``class_folder``; its CSV columns but the label."""
    series = prediction.series
    study_uid = sanitise_uid(series.study.study_instance_uid)
    series_uid = sanitise_uid(series.series_instance_uid)
    if prediction.instance is not None:
        sop_uid = sanitise_uid(prediction.instance.sop_instance_uid)
        target = class_folder / f"{sop_uid}.dcm"
        class_folder.mkdir(exist_ok=True)
        shutil.copyfile(storage_root() / prediction.instance.file_path, target)
    else:
        sop_uid = ""
        target = class_folder / series_uid
        target.mkdir(parents=True)
        for instance in series.instances.order_by("pk"):
            name = f"{sanitise_uid(instance.sop_instance_uid)}.dcm"
            shutil.copyfile(storage_root() / instance.file_path, target / name)
    return {
        "path": target.relative_to(root).as_posix(),
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_instance_uid": sop_uid,
    }

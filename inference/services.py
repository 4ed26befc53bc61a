"""Writes for the inference app: the model registry, routing complete series to jobs, and
keeping jobs moving (a lost queue message is re-created from the rows)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from inference.models import AuditEvent, InferenceJob, ModelVersion, RoutingRule
from inference.selectors import routing_rule_for_series
from studies.models import Series

logger = logging.getLogger(__name__)

RUN_INFERENCE_TASK = "worker.tasks.run_inference"


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
    plus INFERENCE_RECOVER_GRACE seconds.
    Each job is taken with a conditional UPDATE, so two sweepers never both re-send it.
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
    for pk, status, queued_at, started_at in InferenceJob.objects.filter(stuck).values_list(
        "pk", "status", "queued_at", "started_at"
    ):
        won = InferenceJob.objects.filter(
            pk=pk, status=status, queued_at=queued_at, started_at=started_at
        ).update(status=InferenceJob.Status.QUEUED, queued_at=now)
        if won:
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

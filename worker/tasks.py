"""Celery tasks: thin wrappers that take ids and call services.

Queues: "inference" (GPU hosts) for running models, "default" for the sweeper, exports and
reports. The inference pipeline is imported inside its task, so that importing this module
(as the web process may) never loads torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import celeryd_after_setup
from django.conf import settings
from django.db import DatabaseError

from inference.export import outbox_create, outbox_recover, outbox_send
from inference.models import InferenceJob
from inference.services import jobs_recover, series_route
from studies.services import series_sweep

logger = logging.getLogger(__name__)

# Errors worth another try: the database or storage was briefly unavailable, or memory ran out.
TRANSIENT_ERRORS = (DatabaseError, OSError, MemoryError)


# What an inference task imports: torch, torchvision, ONNX Runtime and the pipeline.
INFERENCE_MODULES = ("inference.pipeline", "inference.runners.onnx", "inference.runners.torch")


@celeryd_after_setup.connect
def preload_inference(sender: str, instance: Any, **kwargs: Any) -> None:
    """A worker that consumes the inference queue imports the inference stack once, before its
    pool forks: 2 to 3 s that would otherwise count against each pool process's first job's
    time limit. Workers of the default queue only never load torch."""
    if "inference" in instance.app.amqp.queues.consume_from:
        for module in INFERENCE_MODULES:
            importlib.import_module(module)
        logger.info("inference stack preloaded")


@shared_task(soft_time_limit=60, time_limit=90, ignore_result=True)
def sweep_series() -> list[int]:
    """Periodic: complete quiet series and route them to inference; re-send lost jobs."""
    completed = series_sweep(on_complete=lambda series: series_route(series=series))
    jobs_recover()
    return completed


@shared_task(
    bind=True,
    # Acknowledged only when done: the job is idempotent, so a redelivery after a crash is safe.
    acks_late=True,
    soft_time_limit=settings.INFERENCE_SOFT_TIME_LIMIT,
    time_limit=settings.INFERENCE_HARD_TIME_LIMIT,
    ignore_result=True,
)
def run_inference(self: Task[[int], None], job_id: int) -> None:
    """Run one inference job; retry transient errors with exponential backoff."""
    from inference.pipeline import JobLost, job_release, job_run

    try:
        job_run(job_id=job_id)
    except JobLost:
        logger.warning(
            "job %s: taken over by another attempt; this one's results are dropped", job_id
        )
    except Exception as exc:
        attempt = InferenceJob.objects.filter(pk=job_id).values_list("attempts", flat=True).first()
        if attempt is None:
            raise
        transient = isinstance(exc, TRANSIENT_ERRORS)
        final = not transient or attempt >= settings.INFERENCE_MAX_ATTEMPTS
        job_release(
            job_id=job_id, attempt=attempt, error=f"{type(exc).__name__}: {exc}", final=final
        )
        logger.exception(
            "job %s attempt %s failed%s", job_id, attempt, "" if final else "; retrying"
        )
        if not final:
            raise self.retry(exc=exc, countdown=2**attempt) from exc


@shared_task(
    # Acknowledged only when done: making the outbox is idempotent and items are claimed.
    acks_late=True,
    soft_time_limit=settings.EXPORT_TIME_LIMIT,
    time_limit=settings.EXPORT_TIME_LIMIT + 30,
    ignore_result=True,
)
def export_results(job_id: int) -> None:
    """Make a finished job's DICOM results, queue them per destination and send them."""
    job = InferenceJob.objects.select_related("series__study").filter(pk=job_id).first()
    if job is None:
        logger.warning("job %s: gone before its results were exported", job_id)
        return
    outbox_create(job=job)
    outbox_send(job_id=job_id)


@shared_task(
    soft_time_limit=settings.EXPORT_TIME_LIMIT,
    time_limit=settings.EXPORT_TIME_LIMIT + 30,
    ignore_result=True,
)
def retry_outbox() -> int:
    """Periodic: re-make lost exports and send every outbox item that is due."""
    outbox_recover()
    return outbox_send()

"""Results out: a finished job's DICOM objects queued per destination, and sent by C-STORE.

The outbox is the hand-off: one OutboxItem per object and destination, written in one
transaction with the objects' SOP Instance UIDs fixed, so a retry re-sends the same instance and
a destination gets each object once. Sending claims an item with a conditional UPDATE that also
pushes its next attempt past the time a send may take: two senders never send it at once, and
one that dies leaves it due again. A failed attempt waits with exponential backoff; after
EXPORT_MAX_ATTEMPTS the item is failed, until an administrator resends it.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from pynetdicom.status import code_to_category

from inference.dicom_results import ResultObject, results_write
from inference.models import InferenceJob, OutboxItem
from studies.models import DicomNode

logger = logging.getLogger(__name__)

EXPORT_TASK = "worker.tasks.export_results"
SOP_CLASSES: dict[str, str] = {
    OutboxItem.Kind.STRUCTURED_REPORT: ComprehensiveSRStorage,
    OutboxItem.Kind.SECONDARY_CAPTURE: SecondaryCaptureImageStorage,
}
# At most this many items per run; the periodic retry takes the rest.
_BATCH = 200


def export_enqueue(*, job_id: int) -> None:
    """Queue the export task of a job when the current transaction commits (none on rollback)."""
    transaction.on_commit(
        lambda: current_app.send_task(EXPORT_TASK, args=[job_id], queue="default")
    )


def outbox_create(*, job: InferenceJob) -> list[OutboxItem]:
    """Queue the job's result objects for every destination; return the job's outbox.

    The objects are made once per job: a second call (a redelivered task, a newly added
    destination) makes no new object and adds only the (destination, object) pairs that are
    missing. A job that did not succeed, or no destination, gets nothing.
    """
    if job.status != InferenceJob.Status.SUCCEEDED:
        logger.info("job %s: %s, no results to export", job.pk, job.status)
        return []
    destinations = list(DicomNode.objects.filter(is_destination=True))
    if not destinations:
        logger.info("job %s: no destination for results", job.pk)
        return []
    objects = _objects_made(job)
    fresh = [] if objects else results_write(job=job)
    try:
        with transaction.atomic():
            # Serialises two creators of one job: the second sees the first one's objects.
            InferenceJob.objects.select_for_update().filter(pk=job.pk).first()
            made = _objects_made(job)
            if made and fresh:
                _discard(fresh)
                fresh = []
            OutboxItem.objects.bulk_create(
                [
                    OutboxItem(
                        job=job,
                        destination=destination,
                        kind=result.kind,
                        sop_instance_uid=result.sop_instance_uid,
                        file_path=result.file_path,
                    )
                    for destination in destinations
                    for result in made or fresh
                ],
                ignore_conflicts=True,
            )
    except BaseException:
        _discard(fresh)
        raise
    items = list(job.outbox.select_related("destination").order_by("pk"))
    logger.info("job %s: %d outbox items", job.pk, len(items))
    return items


def outbox_send(*, job_id: int | None = None, now: dt.datetime | None = None) -> int:
    """Send the queued items that are due (of one job, or all), one association per
    destination; return how many were stored by their destination."""
    now = now or timezone.now()
    due = (
        OutboxItem.objects.filter(status=OutboxItem.Status.QUEUED, destination__is_destination=True)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .select_related("destination")
        .order_by("destination_id", "pk")
    )
    if job_id is not None:
        due = due.filter(job_id=job_id)
    claimed = [item for item in due[:_BATCH] if _claim(item, now)]
    sent = 0
    for _, batch in groupby(claimed, key=lambda item: item.destination_id):
        sent += _send_batch(list(batch), now)
    return sent


def outbox_recover(*, now: dt.datetime | None = None) -> list[int]:
    """Make the outbox of recently succeeded jobs that have none (their export task was lost).

    Only jobs that finished between EXPORT_RECOVER_WINDOW and EXPORT_RECOVER_AFTER seconds ago
    and whose results are not superseded; returns their ids.
    """
    now = now or timezone.now()
    if not DicomNode.objects.filter(is_destination=True).exists():
        return []
    jobs = (
        InferenceJob.objects.filter(
            status=InferenceJob.Status.SUCCEEDED,
            finished_at__gte=now - dt.timedelta(seconds=settings.EXPORT_RECOVER_WINDOW),
            finished_at__lte=now - dt.timedelta(seconds=settings.EXPORT_RECOVER_AFTER),
            outbox__isnull=True,
        )
        .exclude(predictions__superseded=True)
        .select_related("series__study")
        .distinct()
    )
    recovered = []
    for job in jobs:
        try:
            outbox_create(job=job)
        except (OSError, ValueError):
            logger.exception("job %s: cannot make its DICOM results", job.pk)
            continue
        recovered.append(job.pk)
    if recovered:
        logger.warning("made the lost outbox of jobs %s", recovered)
    return recovered


def outbox_resend(*, item: OutboxItem) -> OutboxItem:
    """Queue an item to be sent again now, with all its attempts (the admin's "Resend").

    The same file, so the destination receives the same SOP Instance UID again.
    """
    OutboxItem.objects.filter(pk=item.pk).update(
        status=OutboxItem.Status.QUEUED,
        attempts=0,
        next_attempt_at=None,
        last_error="",
        sent_at=None,
    )
    export_enqueue(job_id=item.job_id)
    logger.info("outbox item %s queued again by hand", item.pk)
    item.refresh_from_db()
    return item


def _objects_made(job: InferenceJob) -> list[ResultObject]:
    rows = job.outbox.values_list("kind", "sop_instance_uid", "file_path").distinct()
    return [ResultObject(kind=k, sop_instance_uid=uid, file_path=path) for k, uid, path in rows]


def _discard(objects: Iterable[ResultObject]) -> None:
    for result in objects:
        (Path(settings.INFERENCE_OUTPUT_DIR) / result.file_path).unlink(missing_ok=True)


def _claim(item: OutboxItem, now: dt.datetime) -> bool:
    """Take an item for one attempt; held until a send that started now must have ended."""
    lease = dt.timedelta(seconds=settings.EXPORT_TIME_LIMIT + 60)
    taken = OutboxItem.objects.filter(
        pk=item.pk, status=OutboxItem.Status.QUEUED, attempts=item.attempts
    ).update(attempts=item.attempts + 1, next_attempt_at=now + lease)
    if taken:
        item.attempts += 1
    return taken == 1


def _send_batch(items: list[OutboxItem], now: dt.datetime) -> int:
    """C-STORE the items over one association to their (common) destination."""
    destination = items[0].destination
    ae = AE(ae_title=settings.DICOM_AE_TITLE)
    timeout = settings.EXPORT_NETWORK_TIMEOUT
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for kind in sorted({item.kind for item in items}):
        ae.add_requested_context(
            SOP_CLASSES[kind], [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
        reason = (
            f"association rejected by {peer}"
            if assoc.is_rejected
            else f"no association with {peer} (refused, unreachable or timed out)"
        )
        for item in items:
            _failed(item, reason, now)
        return 0
    sent = 0
    try:
        _no_delay(assoc)
        for item in items:
            if not assoc.is_established:
                _failed(item, "association ended before it was sent", now)
                continue
            try:
                status = assoc.send_c_store(Path(settings.INFERENCE_OUTPUT_DIR) / item.file_path)
            except OSError as exc:  # the file: its path (study UIDs) stays out of the log
                _failed(item, f"cannot read the file: {exc.strerror}", now)
                continue
            except (ValueError, AttributeError) as exc:  # no accepted context, or a bad file
                _failed(item, f"{type(exc).__name__}: {exc}", now)
                continue
            code = status.get("Status")
            if code is None:
                _failed(item, "no C-STORE response (aborted or timed out)", now)
            elif code_to_category(code) in ("Success", "Warning"):
                sent += _sent(item, code)
            else:
                _failed(item, f"C-STORE status 0x{code:04X}", now)
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def _no_delay(assoc: Any) -> None:
    """Send each PDU at once: with Nagle's algorithm, a small PDU behind an unacknowledged one
    waits for the peer's delayed ACK (up to 40 ms a C-STORE). pynetdicom has no option for it."""
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sent(item: OutboxItem, code: int) -> int:
    done = OutboxItem.objects.filter(
        pk=item.pk, status=OutboxItem.Status.QUEUED, attempts=item.attempts
    ).update(
        status=OutboxItem.Status.SENT, sent_at=timezone.now(), next_attempt_at=None, last_error=""
    )
    if code:
        logger.warning("outbox item %s stored with warning status 0x%04X", item.pk, code)
    logger.info("outbox item %s (%s) sent to %s", item.pk, item.kind, item.destination.name)
    return done


def _failed(item: OutboxItem, error: str, now: dt.datetime) -> None:
    """Record a failed attempt: due again after the backoff, or failed after the last one."""
    final = item.attempts >= settings.EXPORT_MAX_ATTEMPTS
    delay = min(settings.EXPORT_RETRY_BASE * 2 ** (item.attempts - 1), settings.EXPORT_RETRY_MAX)
    OutboxItem.objects.filter(
        pk=item.pk, status=OutboxItem.Status.QUEUED, attempts=item.attempts
    ).update(
        status=OutboxItem.Status.FAILED if final else OutboxItem.Status.QUEUED,
        last_error=error[:2000],
        next_attempt_at=None if final else now + dt.timedelta(seconds=delay),
    )
    logger.warning(
        "outbox item %s to %s: attempt %s failed (%s)%s",
        item.pk,
        item.destination.name,
        item.attempts,
        error,
        "; giving up" if final else f"; next in {delay:.0f} s",
    )

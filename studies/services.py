"""Writes for the studies app: storing what a PACS sends, and deciding when a series is complete.

``instance_store_received`` is what the DICOM listener calls for every C-STORE, once the data
set has been streamed into an incoming file; ``instance_store`` does the same for bytes in
memory (tests, benchmarks). Both promise that when they return, the file is on disk (fsynced,
atomically renamed) and its rows are committed. When they cannot keep that promise they raise
``StoreRefused`` with the DICOM status the peer should get (PS3.4 Annex B), and leave nothing
behind.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Field
from django.utils import timezone
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.uid import UID

from studies import storage
from studies.models import AssociationLog, Instance, Patient, Series, Study
from studies.selectors import quiet_seconds

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_DECODE = 0xC210
STATUS_MISSING_UID = 0xC220
STATUS_PROCESSING_FAILURE = 0x0110


class StoreRefused(Exception):
    """An instance that was not stored, with the status and reason to give the peer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SeriesTouches:
    """The series an association touched last, so that it touches it (sets its last arrival and
    re-opens it if complete) at most once per ``SERIES_TOUCH_INTERVAL_S``. On PostgreSQL, that
    update of one hot row cost more than indexing the instance. ``series_sweep`` allows for
    the interval, so a series still completes only after its quiet period since its last
    instance."""

    def __init__(self) -> None:
        self._last: tuple[str, int, float] | None = None  # series UID, id, monotonic time

    def recent(self, series_uid: str) -> int | None:
        """The id of this series if it was touched less than the interval ago."""
        if self._last is None:
            return None
        uid, pk, at = self._last
        fresh = time.monotonic() - at < SERIES_TOUCH_INTERVAL_S
        return pk if uid == series_uid and fresh else None

    def record(self, series_uid: str, pk: int, *, at: float) -> None:
        self._last = (series_uid, pk, at)


SERIES_TOUCH_INTERVAL_S = 1.0


def instance_store(
    *, data: bytes, calling_ae: str, touches: SeriesTouches | None = None
) -> Instance:
    """Store one DICOM Part 10 file given as bytes; see ``instance_store_received``."""
    check_free_disk()
    incoming = storage.IncomingFile()
    try:
        incoming.write(data)
    except BaseException:
        incoming.discard()
        raise
    return instance_store_received(incoming=incoming, calling_ae=calling_ae, touches=touches)


def check_free_disk() -> None:
    if storage.free_disk_bytes() < settings.DICOM_MIN_FREE_DISK_MB * 1024 * 1024:
        raise StoreRefused(STATUS_OUT_OF_RESOURCES, "free disk space is below the floor")


def instance_store_received(
    *, incoming: storage.IncomingFile, calling_ae: str, touches: SeriesTouches | None = None
) -> Instance:
    """Store a received Part 10 file, written in full to ``incoming``, and index it; see the
    module docstring. The file is moved into place or deleted, whatever happens. ``touches``
    is the association's: without it, the series is touched for every instance.
    """
    tmp = incoming.path
    flushed = incoming.flush()
    try:
        size = incoming.size
        dataset = _decode(tmp, size)
        try:
            study_uid = storage.sanitise_uid(dataset.get("StudyInstanceUID"))
            series_uid = storage.sanitise_uid(dataset.get("SeriesInstanceUID"))
            sop_uid = storage.sanitise_uid(dataset.get("SOPInstanceUID"))
            sop_class_uid = storage.sanitise_uid(dataset.get("SOPClassUID"))
        except storage.InvalidUID as exc:
            raise StoreRefused(
                STATUS_MISSING_UID, f"required UID missing or invalid: {exc}"
            ) from None
        meta = dataset.file_meta
        if meta.get("MediaStorageSOPClassUID") not in (None, sop_class_uid):
            raise StoreRefused(
                STATUS_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from request"
            )
        if meta.get("MediaStorageSOPInstanceUID") not in (None, sop_uid):
            raise StoreRefused(STATUS_MISSING_UID, "SOP Instance UID differs from the request")
        return _index(
            dataset=dataset,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            relpath=storage.instance_relpath(
                study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
            ),
            tmp=tmp,
            flushed=flushed,
            size=size,
            calling_ae=calling_ae,
            touches=touches,
        )
    finally:
        futures.wait([flushed])
        incoming.discard()


# Values longer than this are not read while indexing: only checked to lie within the file.
_DEFER_BYTES = 64 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _decode(path: Path, size: int) -> Dataset:
    """Parse the data set's elements so that a truncated or garbled file is refused here.

    Large values (pixel data) are not read, only checked to end within the file. Element
    values stay as read (undecoded) until used: the file is stored as received, so only the
    elements we index need to make sense.
    """
    try:
        dataset = dcmread(path, defer_size=_DEFER_BYTES)
        last = dataset.get_item(max(dataset.keys()), keep_deferred=True)
        # pydicom seeks past deferred values without noticing the end of the file. A deflated
        # data set is inflated in memory first (offsets are not the file's), and zlib notices.
        deflated = UID(dataset.file_meta.get("TransferSyntaxUID", "")).is_deflated
        if not deflated and _end(last) > size:
            raise StoreRefused(STATUS_CANNOT_DECODE, "the data set ends inside an element")
        _check_pixel_data(dataset)
    except StoreRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad input
        raise StoreRefused(STATUS_CANNOT_DECODE, f"dataset cannot be decoded: {exc}") from None
    return dataset


def _end(element: DataElement | RawDataElement | None) -> int:
    """Where a raw element's value ends in the file; 0 when unknown (undefined length, read)."""
    if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
        return 0
    return int(element.value_tell) + int(element.length)


def _check_pixel_data(dataset: Dataset) -> None:
    if "PixelData" not in dataset:
        return
    syntax = UID(dataset.file_meta.get("TransferSyntaxUID", ""))
    if syntax.is_encapsulated:
        return  # fragments were parsed by the read above
    expected = (
        int(dataset.Rows)
        * int(dataset.Columns)
        * int(dataset.get("SamplesPerPixel", 1))
        * int(dataset.get("NumberOfFrames", 1) or 1)
        * int(dataset.BitsAllocated)
        + 7
    ) // 8
    element = dataset.get_item("PixelData", keep_deferred=True)
    length = element.length if isinstance(element, RawDataElement) else len(element.value)
    if length < expected:
        raise StoreRefused(
            STATUS_CANNOT_DECODE, f"pixel data is truncated ({length} of {expected} bytes)"
        )


def _index(
    *,
    dataset: Dataset,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    sop_class_uid: str,
    relpath: str,
    tmp: Path,
    flushed: futures.Future[None],
    size: int,
    calling_ae: str,
    touches: SeriesTouches | None,
) -> Instance:
    now, started = timezone.now(), time.monotonic()
    final = storage.storage_root() / relpath
    existed = final.exists()
    instance = Instance(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        instance_number=_int(dataset.get("InstanceNumber")),
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        file_path=relpath,
        file_size=size,
        received_at=now,
        calling_ae=calling_ae[:16],
    )
    recent = touches.recent(series_uid) if touches is not None else None
    try:
        with transaction.atomic():
            # The file moves into place in the background while its rows are written, and the
            # commit waits for it: a committed row always names a durable file. A file left by
            # a crash before the commit has no row, and the peer, never answered, sends it again.
            placed = storage.commit_incoming(flushed=flushed, tmp=tmp, relpath=relpath)
            try:
                instance.series_id = recent or _series_for(
                    dataset=dataset, study_uid=study_uid, series_uid=series_uid, now=now
                )
                instance.pk = _upsert(
                    instance, unique=("sop_instance_uid",), update=_INSTANCE_UPDATE_FIELDS
                )
            finally:
                futures.wait([placed])
            placed.result()
    except BaseException:
        if not existed:
            final.unlink(missing_ok=True)
        raise
    if touches is not None and recent is None:  # a touch counts once it is committed
        touches.record(series_uid, instance.series_id, at=started)
    logger.debug(
        "stored an instance in series %s from %s (%d bytes)", instance.series_id, calling_ae, size
    )
    return instance


_INSTANCE_UPDATE_FIELDS = (
    "series",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax_uid",
    "file_path",
    "file_size",
    "received_at",
    "calling_ae",
)
# Touch the series and, if it was already complete, re-open it with a new revision: one
# statement per instance on the hot path, which the ORM cannot express (UPDATE … RETURNING).
_TOUCH_SERIES = """
    UPDATE studies_series SET
        revision = CASE WHEN status = %s THEN revision + 1 ELSE revision END,
        completed_at = CASE WHEN status = %s THEN NULL ELSE completed_at END,
        status = %s,
        last_received_at = %s
    WHERE series_instance_uid = %s
    RETURNING id
"""


def _series_for(*, dataset: Dataset, study_uid: str, series_uid: str, now: dt.datetime) -> int:
    """The id of the series row for this instance, created (with study and patient) or touched."""
    complete, receiving = Series.Status.COMPLETE, Series.Status.RECEIVING
    with connection.cursor() as cursor:
        cursor.execute(_TOUCH_SERIES, [complete, complete, receiving, now, series_uid])
        row = cursor.fetchone()
    if row is not None:
        return int(row[0])
    # Upserts, one statement each: the first instance of a series is on the hot path too (every
    # radiograph is its own series). An existing patient or study keeps its values; a series
    # created by another association a moment ago is touched, as above.
    patient = Patient(
        patient_id=str(dataset.get("PatientID", ""))[:64],
        issuer_of_patient_id=str(dataset.get("IssuerOfPatientID", ""))[:64],
        name=str(dataset.get("PatientName", ""))[:324],
        birth_date=_date(dataset.get("PatientBirthDate")),
        sex=str(dataset.get("PatientSex", ""))[:16],
        created_at=now,
    )
    study = Study(
        study_instance_uid=study_uid,
        patient_id=_upsert(patient, unique=("patient_id", "issuer_of_patient_id")),
        study_date=_date(dataset.get("StudyDate")),
        accession_number=str(dataset.get("AccessionNumber", ""))[:64],
        description=str(dataset.get("StudyDescription", ""))[:128],
        created_at=now,
    )
    series = Series(
        series_instance_uid=series_uid,
        study_id=_upsert(study, unique=("study_instance_uid",)),
        modality=str(dataset.get("Modality", "")).upper()[:16],
        body_part_examined=str(dataset.get("BodyPartExamined", ""))[:64],
        series_description=str(dataset.get("SeriesDescription", ""))[:64],
        series_number=_int(dataset.get("SeriesNumber")),
        view_position=str(dataset.get("ViewPosition", ""))[:16],
        first_received_at=now,
        last_received_at=now,
    )
    return _upsert(series, unique=("series_instance_uid",), update=("last_received_at",))


def _upsert(row: models.Model, *, unique: tuple[str, ...], update: tuple[str, ...] = ()) -> int:
    """Insert ``row`` or, if one with the same ``unique`` fields exists, change that one's
    ``update`` fields (by default, none); return the row's id. One statement, INSERT … ON
    CONFLICT … RETURNING, built once per shape: the ORM's bulk_create compiles it for every
    call, which cost more than running it."""
    fields = _concrete_fields(type(row))
    params = [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(_upsert_sql(type(row), unique, update), params)
        return int(cursor.fetchone()[0])


@functools.cache
def _concrete_fields(model: type[models.Model]) -> list[Field[object, object]]:
    return [field for field in model._meta.concrete_fields if not field.primary_key]


@functools.cache
def _upsert_sql(model: type[models.Model], unique: tuple[str, ...], update: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    column = {field.name: quote(str(field.column)) for field in model._meta.concrete_fields}
    names = [field.name for field in _concrete_fields(model)]
    changed = [column[name] for name in update or unique[:1]]
    # Only names from the model's meta, quoted, go into the text; values are parameters.
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(column[n] for n in names)})"  # noqa: S608
        f" VALUES ({', '.join(['%s'] * len(names))})"
        f" ON CONFLICT ({', '.join(column[name] for name in unique)})"
        f" DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in changed)}"
        f" RETURNING {column['id']}"
    )


def series_sweep(
    *, now: dt.datetime | None = None, on_complete: Callable[[Series], object] | None = None
) -> list[int]:
    """Mark series that have been quiet long enough as complete; return the ids this call claimed.

    Each series is claimed with a conditional UPDATE, so two sweepers running at once never
    complete the same series twice, and an instance arriving in between keeps it open.
    ``on_complete`` (e.g. routing to inference) runs in the same transaction as the claim: if it
    fails, the series stays open and the next sweep tries again.
    """
    now = now or timezone.now()
    claimed: list[int] = []
    receiving = Series.objects.filter(status=Series.Status.RECEIVING)
    for pk, modality, last in receiving.values_list("pk", "modality", "last_received_at"):
        # A series' last arrival may be up to one touch interval older than its last instance.
        cutoff = now - dt.timedelta(seconds=quiet_seconds(modality) + SERIES_TOUCH_INTERVAL_S)
        if last > cutoff:
            continue
        try:
            with transaction.atomic():
                won = Series.objects.filter(
                    pk=pk, status=Series.Status.RECEIVING, last_received_at__lte=cutoff
                ).update(status=Series.Status.COMPLETE, completed_at=now)
                if won and on_complete is not None:
                    on_complete(Series.objects.get(pk=pk))
        except Exception:
            logger.exception("completing series %s failed; it stays open", pk)
            continue
        if won:
            claimed.append(pk)
    if claimed:
        logger.info("series complete: %s", claimed)
    return claimed


def association_log_record(
    *,
    calling_ae: str,
    called_ae: str,
    peer_ip: str | None,
    started_at: dt.datetime,
    stored: int,
    failed: int,
    outcome: str,
    detail: str = "",
) -> AssociationLog:
    return AssociationLog.objects.create(
        calling_ae=calling_ae[:16],
        called_ae=called_ae[:16],
        peer_ip=peer_ip,
        started_at=started_at,
        ended_at=timezone.now(),
        instances_stored=stored,
        instances_failed=failed,
        outcome=outcome,
        detail=detail[:255],
    )


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None

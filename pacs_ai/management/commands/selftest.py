"""``manage.py selftest``: a synthetic study through the running system, stage by stage."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from inference.models import InferenceJob, OutboxItem, Prediction
from studies import storage
from studies.models import Patient, Series, Study

SELFTEST_PATIENT = "PACS-AI-SELFTEST"
VERIFICATION = "1.2.840.10008.1.1"


class StageFailed(Exception):
    pass


class Command(BaseCommand):
    help = (
        "Send a synthetic chest X-ray through the running system (listener, scheduler, worker, "
        "export) and say pass or fail per stage, with timings. Its rows and files are removed "
        "afterwards unless --keep."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.DICOM_PORT)
        parser.add_argument("--timeout", type=float, default=180.0, help="seconds per stage")
        parser.add_argument("--keep", action="store_true", help="keep the synthetic study")

    def handle(self, *args: Any, **options: Any) -> None:
        dataset = synthetic_radiograph()
        series_uid = dataset.SeriesInstanceUID
        timeout = options["timeout"]
        stages: list[tuple[str, Callable[[], str]]] = [
            ("echo", lambda: echo(options["host"], options["port"])),
            ("store", lambda: store(options["host"], options["port"], dataset)),
            ("complete", lambda: wait(lambda: completed(series_uid), timeout)),
            ("inferred", lambda: wait(lambda: inferred(series_uid), timeout)),
            ("exported", lambda: wait(lambda: exported(series_uid), timeout)),
        ]
        failed = False
        try:
            for name, stage in stages:
                start = time.monotonic()
                try:
                    detail = stage()
                except StageFailed as exc:
                    self.stdout.write(self.style.ERROR(f"FAIL  {name:<9} {exc}"))
                    failed = True
                    break
                seconds = time.monotonic() - start
                self.stdout.write(self.style.SUCCESS(f"PASS  {name:<9} {seconds:6.2f} s  {detail}"))
        finally:
            if not options["keep"]:
                remove(dataset.StudyInstanceUID)
        if failed:
            raise CommandError("selftest failed")


def synthetic_radiograph() -> Dataset:
    """A 256x256 chest DX with fresh UIDs and an obviously synthetic patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = SELFTEST_PATIENT, "SELFTEST^PACS-AI"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SeriesDescription = "pacs-ai selftest"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:256, 0:256]
    ds.PixelData = ((np.hypot(x - 128, y - 128) * 16) % 4096).astype(np.uint16).tobytes()
    return ds


def echo(host: str, port: int) -> str:
    ae = AE(ae_title="PACS_AI_TEST")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title=settings.DICOM_AE_TITLE)
    if not assoc.is_established:
        raise StageFailed(f"no association with {settings.DICOM_AE_TITLE} at {host}:{port}")
    status = assoc.send_c_echo()
    assoc.release()
    if getattr(status, "Status", None) != 0:
        raise StageFailed("C-ECHO did not succeed")
    return f"{settings.DICOM_AE_TITLE} at {host}:{port}"


def store(host: str, port: int, dataset: Dataset) -> str:
    ae = AE(ae_title="PACS_AI_TEST")
    ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=settings.DICOM_AE_TITLE)
    if not assoc.is_established:
        raise StageFailed("association refused: is PACS_AI_TEST an allowed calling AE?")
    status = assoc.send_c_store(dataset)
    assoc.release()
    if getattr(status, "Status", None) != 0:
        raise StageFailed(f"C-STORE status 0x{getattr(status, 'Status', 0xFFFF):04X}")
    return "1 instance"


def completed(series_uid: str) -> str:
    series = Series.objects.filter(series_instance_uid=series_uid).first()
    return "series complete" if series and series.status == Series.Status.COMPLETE else ""


def inferred(series_uid: str) -> str:
    job = InferenceJob.objects.filter(series__series_instance_uid=series_uid).last()
    if job is None or job.status not in (InferenceJob.Status.SUCCEEDED, InferenceJob.Status.FAILED):
        return ""
    if job.status == InferenceJob.Status.FAILED:
        raise StageFailed(f"job {job.pk} failed: {job.error[:200]}")
    prediction = Prediction.objects.filter(job=job).first()
    if prediction is None:
        raise StageFailed(f"job {job.pk} succeeded without a prediction")
    if prediction.status != Prediction.Status.ANALYSED:
        raise StageFailed(f"not analysed: {prediction.reason}")
    return (
        f"{prediction.label} p={prediction.probability:.3f} by {prediction.model_name} "
        f"{prediction.model_version}"
    )


def exported(series_uid: str) -> str:
    items = OutboxItem.objects.filter(job__series__series_instance_uid=series_uid)
    if not items.exists():
        return "no destination configured: skipped"
    if items.filter(status=OutboxItem.Status.FAILED).exists():
        raise StageFailed("an export failed; see the outbox in the admin")
    pending = items.exclude(status=OutboxItem.Status.SENT).count()
    return "" if pending else f"{items.count()} objects sent"


def wait(check: Callable[[], str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = check()
        if detail:
            return detail
        time.sleep(0.25)
    raise StageFailed(f"not reached within {timeout:.0f} s: are the scheduler and worker running?")


def remove(study_uid: str) -> None:
    """Delete the synthetic study's rows and files (AI outputs included)."""
    for series in Series.objects.filter(study__study_instance_uid=study_uid):
        series.delete()
    Study.objects.filter(study_instance_uid=study_uid).delete()
    Patient.objects.filter(Q(patient_id=SELFTEST_PATIENT), ~Q(studies__isnull=False)).delete()
    for root in (storage.storage_root(), settings.INFERENCE_OUTPUT_DIR):
        shutil.rmtree(root / storage.sanitise_uid(study_uid), ignore_errors=True)

"""Results out to a real DICOM receiver: DCMTK's storescp on loopback plays the PACS."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import current_app
from django.conf import settings
from django.utils import timezone
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from inference.export import outbox_create, outbox_recover, outbox_resend, outbox_send
from inference.models import InferenceJob, OutboxItem, Prediction
from studies.bench import dcmtk, dcmtk_env
from studies.models import DicomNode, Series
from tests.conftest import free_port, requires_dcmtk, start_worker, stop_worker, wait_for
from tests.factories import CR_JPEG
from tests.inference.test_dicom_results import dsrdump, finished_job

pytestmark = requires_dcmtk

Receiver = Callable[[int], Path]


@pytest.fixture(autouse=True)
def results_settings(settings, tmp_path):
    """Heatmaps for every prediction, and each test's results in a folder of its own."""
    settings.INFERENCE_GRADCAM = "always"
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"
    settings.EXPORT_NETWORK_TIMEOUT = 5


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Receiver]:
    """Starts DCMTK's storescp (AE "PACS") on a port; returns the folder it stores into.

    Each received object gets a file of its own (+uf), so a copy received twice shows twice.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> Path:
        folder = tmp_path / f"pacs-{port}"
        folder.mkdir()
        process = subprocess.Popen(
            [dcmtk("storescp"), "-aet", "PACS", "+uf", "-od", str(folder), str(port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        wait_for(lambda: process.poll() is not None or echo(port), timeout=15)
        assert process.poll() is None, "storescp exited"
        return folder

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def echo(port: int) -> bool:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def destination(port: int, name: str = "pacs") -> DicomNode:
    return DicomNode.objects.create(
        name=name,
        ae_title="PACS",
        host="127.0.0.1",
        port=port,
        may_store=False,
        is_destination=True,
    )


def received(folder: Path) -> list[Dataset]:
    return [dcmread(path) for path in sorted(folder.iterdir()) if path.is_file()]


def statuses(job: InferenceJob) -> list[tuple[str, str, int]]:
    rows = job.outbox.order_by("kind").values_list("kind", "status", "attempts")
    return list(rows)


@pytest.mark.django_db
def test_a_result_reaches_the_pacs_as_an_sr_and_a_secondary_capture(register_model, storescp):
    register_model("cxr2d")
    port = free_port()
    folder = storescp(port)
    destination(port)
    job = finished_job([CR_JPEG], task="cxr2d")
    prediction = Prediction.objects.get(job=job)

    items = outbox_create(job=job)
    sent = outbox_send(job_id=job.pk)

    assert sent == 2
    assert statuses(job) == [("sc", "sent", 1), ("sr", "sent", 1)]
    by_uid = {ds.SOPInstanceUID: ds for ds in received(folder)}
    assert set(by_uid) == {item.sop_instance_uid for item in items}
    original = job.series.study.study_instance_uid
    assert {ds.StudyInstanceUID for ds in by_uid.values()} == {original}
    assert not {ds.SeriesInstanceUID for ds in by_uid.values()} & {job.series.series_instance_uid}
    (report,) = [p for p in folder.iterdir() if dcmread(p).SOPClassUID == ComprehensiveSRStorage]
    text = dsrdump(report)
    assert f'"Finding")="{prediction.label}"' in text
    assert "not for diagnostic use" in text
    (capture,) = [ds for ds in by_uid.values() if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert capture.PhotometricInterpretation == "RGB"
    assert capture.pixel_array.shape == (capture.Rows, capture.Columns, 3)
    assert capture.BurnedInAnnotation == "YES"


@pytest.mark.django_db
def test_a_pacs_that_is_down_gets_the_results_once_when_it_is_up(register_model, storescp):
    register_model("cxr2d")
    port = free_port()  # nothing listens there yet
    destination(port)
    job = finished_job([CR_JPEG], task="cxr2d")
    items = outbox_create(job=job)
    before = timezone.now()

    assert outbox_send(job_id=job.pk) == 0

    assert statuses(job) == [("sc", "queued", 1), ("sr", "queued", 1)]
    for item in job.outbox.all():
        assert item.next_attempt_at is not None
        assert item.next_attempt_at >= before + dt.timedelta(seconds=settings.EXPORT_RETRY_BASE)
        assert "association" in item.last_error
    folder = storescp(port)
    assert outbox_send() == 0  # not due yet: the backoff holds
    assert statuses(job) == [("sc", "queued", 1), ("sr", "queued", 1)]

    due = max(item.next_attempt_at for item in job.outbox.all() if item.next_attempt_at)
    assert outbox_send(now=due + dt.timedelta(seconds=1)) == 2
    assert outbox_send(now=due + dt.timedelta(days=1)) == 0  # sent items are not sent again

    assert statuses(job) == [("sc", "sent", 2), ("sr", "sent", 2)]
    copies = Counter(ds.SOPInstanceUID for ds in received(folder))
    assert copies == {item.sop_instance_uid: 1 for item in items}


@pytest.mark.django_db
def test_making_the_outbox_twice_makes_nothing_new(register_model):
    register_model("cxr2d")
    first_pacs, second_pacs = destination(free_port(), "first"), destination(free_port(), "second")
    job = finished_job([CR_JPEG], task="cxr2d")

    first = outbox_create(job=job)
    second = outbox_create(job=job)

    assert [item.pk for item in first] == [item.pk for item in second]
    assert len(first) == 4  # an SR and a capture, for each destination
    uids = {item.sop_instance_uid for item in first}
    for pacs in (first_pacs, second_pacs):
        assert sorted(pacs.outbox.values_list("sop_instance_uid", flat=True)) == sorted(uids)
    folder = (settings.INFERENCE_OUTPUT_DIR / first[0].file_path).parent
    assert sorted(path.stem for path in folder.iterdir()) == sorted(uids)
    # A destination added later gets the same objects, not new ones.
    later = destination(free_port(), "later")
    third = outbox_create(job=job)
    assert len(third) == 6
    assert set(later.outbox.values_list("sop_instance_uid", flat=True)) == uids


@pytest.mark.django_db
def test_a_job_that_did_not_succeed_or_has_no_destination_gets_no_outbox(register_model):
    register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    assert outbox_create(job=job) == []  # no destination
    destination(free_port())
    InferenceJob.objects.filter(pk=job.pk).update(status=InferenceJob.Status.FAILED)
    job.refresh_from_db()

    assert outbox_create(job=job) == []
    assert not OutboxItem.objects.exists()


@pytest.mark.django_db
def test_a_finished_job_whose_export_task_was_lost_gets_its_outbox_from_the_sweep(register_model):
    register_model("cxr2d")
    destination(free_port())
    job = finished_job([CR_JPEG], task="cxr2d")
    assert job.finished_at is not None
    just_after = job.finished_at + dt.timedelta(seconds=1)
    a_while_after = job.finished_at + dt.timedelta(seconds=settings.EXPORT_RECOVER_AFTER + 1)

    assert outbox_recover(now=just_after) == []  # its export task may still be on its way
    assert outbox_recover(now=a_while_after) == [job.pk]
    assert outbox_recover(now=a_while_after) == []

    assert sorted(job.outbox.values_list("kind", "status")) == [("sc", "queued"), ("sr", "queued")]


@pytest.mark.django_db
def test_after_the_last_attempt_an_item_fails_until_it_is_resent(
    register_model, storescp, settings, django_capture_on_commit_callbacks
):
    settings.EXPORT_MAX_ATTEMPTS = 2
    register_model("cxr2d")
    port = free_port()
    destination(port)
    job = finished_job([CR_JPEG], task="cxr2d")
    outbox_create(job=job)
    outbox_send(job_id=job.pk)
    later = timezone.now() + dt.timedelta(days=1)

    outbox_send(now=later)
    outbox_send(now=later + dt.timedelta(days=1))

    assert statuses(job) == [("sc", "failed", 2), ("sr", "failed", 2)]
    report = job.outbox.get(kind="sr")
    assert report.next_attempt_at is None
    assert report.last_error
    folder = storescp(port)
    with django_capture_on_commit_callbacks() as callbacks:
        resent = outbox_resend(item=report)
    assert (resent.status, resent.attempts, resent.last_error) == ("queued", 0, "")
    assert len(callbacks) == 1  # the export task, queued when the resend commits

    assert outbox_send(job_id=job.pk) == 1

    assert statuses(job) == [("sc", "failed", 2), ("sr", "sent", 1)]
    assert [ds.SOPInstanceUID for ds in received(folder)] == [report.sop_instance_uid]


def tried_and_queued(job: InferenceJob, *, count: int) -> bool:
    """The job has ``count`` items, each tried at least once and waiting for a retry."""
    rows = statuses(job)
    return len(rows) == count and all(s == "queued" and a >= 1 for _, s, a in rows)


@pytest.fixture
def export_worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    """A worker that retries the outbox every half second, one second after a failure."""
    return {
        **worker_env,
        "EXPORT_RETRY_INTERVAL": "0.5",
        "EXPORT_RETRY_BASE": "1",
        "EXPORT_NETWORK_TIMEOUT": "5",
    }


@pytest.mark.timeout(180)
def test_a_real_worker_exports_a_job_and_its_beat_retries_until_the_pacs_is_up(
    register_model, storescp, export_worker_env, tmp_path, settings
):
    # The worker reads the heatmap where its settings put outputs: under its data directory.
    settings.INFERENCE_OUTPUT_DIR = settings.PACS_AI_DATA_DIR / "outputs"
    register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    # Complete, so that the worker's sweeper does not route the series again.
    Series.objects.filter(pk=job.series_id).update(status=Series.Status.COMPLETE)
    port = free_port()
    destination(port)
    worker = start_worker(export_worker_env, tmp_path)
    try:
        current_app.send_task("worker.tasks.export_results", args=[job.pk], queue="default")
        wait_for(lambda: tried_and_queued(job, count=2), timeout=60)  # the PACS is down
        folder = storescp(port)

        wait_for(lambda: [s for _, s, _ in statuses(job)] == ["sent", "sent"], timeout=60)
    finally:
        stop_worker(worker, tmp_path)

    copies = Counter(ds.SOPInstanceUID for ds in received(folder))
    assert copies == {item.sop_instance_uid: 1 for item in job.outbox.all()}

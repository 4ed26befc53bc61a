"""instance_store, called directly as the listener calls it: what is stored, what is refused."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from django.db import DatabaseError
from django.utils import timezone
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from studies import services, storage
from studies.models import Instance, Patient, Series, Study
from studies.selectors import quiet_seconds
from tests.conftest import wait_for
from tests.factories import encode, make_dataset

pytestmark = pytest.mark.django_db


def stored_file(instance: Instance) -> Path:
    return storage.storage_root() / instance.file_path


def test_it_stores_the_file_as_received_and_indexes_it():
    ds = make_dataset(AccessionNumber="ACC1", SeriesDescription="AX 1mm")
    data = encode(ds)

    instance = services.instance_store(data=data, calling_ae="MODALITY")

    assert stored_file(instance).read_bytes() == data
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.file_size == len(data)
    assert instance.calling_ae == "MODALITY"
    assert instance.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    series = Series.objects.select_related("study__patient").get()
    assert series.status == Series.Status.RECEIVING
    assert series.series_description == "AX 1mm"
    assert series.study.accession_number == "ACC1"
    assert series.study.patient.patient_id == "TEST-0001"
    assert series.study.study_date == dt.date(2026, 1, 1)


def test_the_path_is_built_from_uids_only():
    ds = make_dataset(PatientID="../../etc/passwd", PatientName="../x")

    instance = services.instance_store(data=encode(ds), calling_ae="A")

    assert instance.file_path == (
        f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    )


def test_a_duplicate_keeps_one_row_and_replaces_the_file():
    ds = make_dataset()
    services.instance_store(data=encode(ds), calling_ae="A")
    ds.InstanceNumber = 7
    second = encode(ds)

    instance = services.instance_store(data=second, calling_ae="A")

    assert Instance.objects.count() == 1
    assert stored_file(instance).read_bytes() == second
    assert instance.instance_number == 7
    assert not list(stored_file(instance).parent.glob(".incoming-*"))


def test_a_database_error_while_the_file_goes_into_place_leaves_nothing(monkeypatch):
    def fail(**kwargs: object) -> int:
        raise DatabaseError("injected after the file's move began")

    monkeypatch.setattr(services, "_series_for", fail)

    with pytest.raises(DatabaseError):
        services.instance_store(data=encode(make_dataset()), calling_ae="A")

    assert not Instance.objects.exists()
    root = storage.storage_root()
    assert [path for path in root.rglob("*") if path.is_file()] == []


def resident_bytes(path: Path) -> int:
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux's fincore")
def test_a_stored_file_leaves_the_page_cache():
    """A PACS sends more than memory holds: once durable, a file's pages are given back."""
    instance = services.instance_store(
        data=encode(make_dataset(rows=512, columns=512)), calling_ae="A"
    )

    wait_for(lambda: resident_bytes(stored_file(instance)) == 0, timeout=10)


def test_instances_of_one_series_share_patient_study_and_series():
    first = make_dataset()
    second = make_dataset(
        StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID
    )
    services.instance_store(data=encode(first), calling_ae="A")
    services.instance_store(data=encode(second), calling_ae="A")

    assert (Patient.objects.count(), Study.objects.count(), Series.objects.count()) == (1, 1, 1)
    assert Instance.objects.count() == 2


@pytest.mark.parametrize("cut", [10, 200, 600, -40])
def test_a_truncated_dataset_is_refused_and_leaves_nothing(cut):
    data = encode(make_dataset())

    with pytest.raises(services.StoreRefused) as refused:
        services.instance_store(data=data[:cut], calling_ae="A")

    assert 0xC000 <= refused.value.status <= 0xCFFF
    assert not Instance.objects.exists()
    assert not Series.objects.exists()
    assert not list(storage.storage_root().rglob("*.dcm"))


def test_garbage_is_refused_as_undecodable():
    with pytest.raises(services.StoreRefused) as refused:
        services.instance_store(data=b"\x00" * 128 + b"DICM" + b"\xff" * 64, calling_ae="A")

    assert 0xC000 <= refused.value.status <= 0xCFFF


@pytest.mark.parametrize("uid", ["", "1.2.3.../../x", "1.2.abc", "1." * 40])
def test_a_missing_or_invalid_uid_is_refused(uid):
    ds = make_dataset(SeriesInstanceUID=uid)

    with pytest.raises(services.StoreRefused) as refused:
        services.instance_store(data=encode(ds), calling_ae="A")

    assert refused.value.status == services.STATUS_MISSING_UID
    assert not Instance.objects.exists()


def test_below_the_disk_floor_it_refuses_out_of_resources(settings):
    settings.DICOM_MIN_FREE_DISK_MB = 1 << 40  # an exabyte: never free

    with pytest.raises(services.StoreRefused) as refused:
        services.instance_store(data=encode(make_dataset()), calling_ae="A")

    assert refused.value.status == services.STATUS_OUT_OF_RESOURCES
    assert not Instance.objects.exists()


def test_an_instance_after_completion_reopens_the_series_with_a_new_revision():
    first = make_dataset()
    services.instance_store(data=encode(first), calling_ae="A")
    later = timezone.now() + dt.timedelta(hours=1)
    assert services.series_sweep(now=later) == [Series.objects.get().pk]
    late = make_dataset(
        StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID
    )

    services.instance_store(data=encode(late), calling_ae="A")

    series = Series.objects.get()
    assert series.status == Series.Status.RECEIVING
    assert series.revision == 2
    assert series.completed_at is None


def test_an_association_touches_its_series_once_an_interval_and_the_sweep_allows_for_it(
    monkeypatch,
):
    monkeypatch.setattr(services, "SERIES_TOUCH_INTERVAL_S", 60.0)  # however slow this host is
    touches = services.SeriesTouches()  # one association's
    first = make_dataset()
    services.instance_store(data=encode(first), calling_ae="A", touches=touches)
    touched = Series.objects.get().last_received_at
    same_series = {
        "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID,
    }

    last = services.instance_store(
        data=encode(make_dataset(**same_series)), calling_ae="A", touches=touches
    )

    series = Series.objects.get()
    assert series.last_received_at == touched < last.received_at
    assert series.instances.count() == 2
    quiet = dt.timedelta(seconds=quiet_seconds("CT"))
    interval = dt.timedelta(seconds=services.SERIES_TOUCH_INTERVAL_S)
    assert last.received_at - touched < interval
    # Quiet since the series' recorded last arrival, but not yet since its last instance.
    assert services.series_sweep(now=touched + quiet + dt.timedelta(milliseconds=1)) == []
    assert services.series_sweep(now=touched + quiet + interval) == [series.pk]


def test_the_sweep_waits_for_the_quiet_period_of_each_modality(settings):
    settings.SERIES_QUIET_SECONDS = {"CR": 5, "CT": 30, "*": 15}
    ct = services.instance_store(data=encode(make_dataset()), calling_ae="A").series
    cr = services.instance_store(data=encode(make_dataset(Modality="CR")), calling_ae="A").series
    start = Series.objects.get(pk=ct.pk).last_received_at

    assert services.series_sweep(now=start + dt.timedelta(seconds=4)) == []
    # Up to a touch interval (1 s) later than the quiet period: see the test above.
    assert services.series_sweep(now=start + dt.timedelta(seconds=7)) == [cr.pk]
    assert services.series_sweep(now=start + dt.timedelta(seconds=29)) == []
    assert services.series_sweep(now=start + dt.timedelta(seconds=32)) == [ct.pk]
    assert services.series_sweep(now=start + dt.timedelta(seconds=60)) == []


def test_the_stored_file_reads_back_equal():
    ds = make_dataset()
    instance = services.instance_store(data=encode(ds), calling_ae="A")

    back = dcmread(stored_file(instance))

    assert back == ds
    assert back.PixelData == ds.PixelData


def test_a_deflated_data_set_is_stored_as_received():
    ds = make_dataset(rows=256, columns=256)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = encode(ds)

    instance = services.instance_store(data=data, calling_ae="A")

    assert stored_file(instance).read_bytes() == data
    assert dcmread(stored_file(instance)).PixelData == ds.PixelData
    with pytest.raises(services.StoreRefused):
        services.instance_store(data=data[:-100], calling_ae="A")

"""DCMTK's echoscu and storescu, real programs over loopback, against the listener."""

from __future__ import annotations

import subprocess

from pydicom import dcmread

from studies.bench import dcmtk as dcmtk_program
from studies.bench import dcmtk_env
from studies.models import AssociationLog, DicomNode, Instance, Series
from tests.conftest import requires_dcmtk, wait_for
from tests.factories import CR_JPEG, CT_SERIES

pytestmark = requires_dcmtk


def dcmtk(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_program(program), *args],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_echoscu_gets_an_answer(listener):
    result = dcmtk("echoscu", "-aet", "MODALITY", "-aec", "PACS_AI", "127.0.0.1", str(listener))
    assert result.returncode == 0, result.stderr


def test_storescu_of_the_real_ct_series_stores_every_element(listener, storage_dir):
    sent = sorted(CT_SERIES.glob("*.dcm"))

    result = dcmtk("storescu", "-aet", "MODALITY", "127.0.0.1", str(listener), *map(str, sent))

    assert result.returncode == 0, result.stderr
    assert Instance.objects.count() == len(sent) == 30
    assert Series.objects.get().modality == "CT"
    by_uid = {i.sop_instance_uid: storage_dir / i.file_path for i in Instance.objects.all()}
    for path in sent:
        original = dcmread(path)
        stored = dcmread(by_uid[original.SOPInstanceUID])
        assert stored == original  # element for element, pixel data included
        assert stored.PixelData == original.PixelData


def test_storescu_sends_the_jpeg_cr_unchanged(listener, storage_dir):
    result = dcmtk("storescu", "-xy", "127.0.0.1", str(listener), str(CR_JPEG))

    assert result.returncode == 0, result.stderr
    stored = dcmread(storage_dir / Instance.objects.get().file_path)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert stored == dcmread(CR_JPEG)


def test_sending_the_same_series_twice_keeps_one_row_per_instance(listener):
    files = [str(p) for p in sorted(CT_SERIES.glob("*.dcm"))[:5]]

    assert dcmtk("storescu", "127.0.0.1", str(listener), *files).returncode == 0
    assert dcmtk("storescu", "127.0.0.1", str(listener), *files).returncode == 0

    assert Instance.objects.count() == 5


def test_an_unknown_ae_is_rejected_and_nothing_stored(listener, settings):
    settings.DICOM_ACCEPT_ALL = False
    DicomNode.objects.create(name="pacs", ae_title="HOSPITAL_PACS", host="127.0.0.1")
    some_file = str(next(CT_SERIES.glob("*.dcm")))

    rejected = dcmtk("storescu", "-aet", "INTRUDER", "127.0.0.1", str(listener), some_file)
    accepted = dcmtk("storescu", "-aet", "HOSPITAL_PACS", "127.0.0.1", str(listener), some_file)

    assert rejected.returncode != 0
    assert "Rejected" in rejected.stderr or "rejected" in rejected.stderr.lower()
    assert accepted.returncode == 0, accepted.stderr
    assert Instance.objects.count() == 1
    wait_for(lambda: AssociationLog.objects.filter(outcome="rejected").exists(), timeout=10)


def test_short_pixel_data_gets_a_failure_status_and_leaves_no_row(listener, tmp_path):
    ds = dcmread(next(CT_SERIES.glob("*.dcm")))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "short.dcm")

    result = dcmtk("storescu", "-v", "127.0.0.1", str(listener), str(tmp_path / "short.dcm"))

    assert "Error: CannotUnderstand" in result.stdout + result.stderr
    assert not Instance.objects.exists()

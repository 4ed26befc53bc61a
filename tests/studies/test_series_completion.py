"""Series completion by the real scheduler in a real Celery worker process."""

from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from studies.bench import dcmtk, dcmtk_env
from studies.models import Series
from tests.conftest import requires_dcmtk, wait_for
from tests.factories import CT_SERIES, make_dataset


def send(port: int, *datasets) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def status_of(series_uid: str) -> tuple[str, int] | None:
    return (
        Series.objects.filter(series_instance_uid=series_uid)
        .values_list("status", "revision")
        .first()
    )


@pytest.mark.timeout(120)
def test_a_quiet_series_is_completed_by_the_worker_and_reopened_by_a_late_instance(
    listener, celery_worker
):
    first = make_dataset()
    same_series = {
        "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID,
    }
    send(listener, first, make_dataset(**same_series))
    uid = first.SeriesInstanceUID
    assert status_of(uid) == ("receiving", 1)

    wait_for(lambda: status_of(uid) == ("complete", 1), timeout=60)

    send(listener, make_dataset(**same_series))
    assert status_of(uid) == ("receiving", 2)
    wait_for(lambda: status_of(uid) == ("complete", 2), timeout=60)
    assert Series.objects.get().instances.count() == 3


@pytest.mark.timeout(180)
@requires_dcmtk
def test_the_real_ct_series_from_storescu_becomes_one_complete_series(listener, celery_worker):
    files = sorted(str(path) for path in CT_SERIES.glob("*.dcm"))
    result = subprocess.run(
        [dcmtk("storescu"), "127.0.0.1", str(listener), *files],
        env=dcmtk_env(),
        capture_output=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    series = wait_for(
        lambda: Series.objects.filter(status=Series.Status.COMPLETE).first(), timeout=60
    )
    assert Series.objects.count() == 1
    assert series.instances.count() == 30

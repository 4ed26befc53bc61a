"""``/metrics``: what Prometheus scrapes, computed from the rows, and its optional bearer token."""

from __future__ import annotations

import datetime as dt

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from inference.models import InferenceJob, OutboxItem
from studies import services as studies_services
from studies.models import DicomNode, Series
from tests.factories import encode, make_dataset

pytestmark = pytest.mark.django_db

T0 = timezone.now() - dt.timedelta(hours=1)


def scrape(**headers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = Client().get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def store(**tags) -> Series:
    data = encode(make_dataset(PatientID="SECRET-PID-77", **tags))
    return studies_services.instance_store(data=data, calling_ae="MODALITY").series


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_counts_and_queue_depth_come_from_the_rows():
    series = store()
    store(
        SeriesInstanceUID=series.series_instance_uid,
        StudyInstanceUID=series.study.study_instance_uid,
    )
    for status in ("queued", "queued", "running", "failed"):
        InferenceJob.objects.create(
            series=series, series_revision=1, task="cxr2d", mode="per_series", status=status
        )

    metrics = scrape()

    assert metrics[("pacs_ai_instances_received_total", ())] == 2
    assert metrics[("pacs_ai_series", (("status", "receiving"),))] == 1
    assert metrics[("pacs_ai_jobs", (("status", "queued"),))] == 2
    assert metrics[("pacs_ai_jobs", (("status", "running"),))] == 1
    assert metrics[("pacs_ai_jobs", (("status", "failed"),))] == 1
    assert metrics[("pacs_ai_jobs", (("status", "succeeded"),))] == 0


def test_stage_latencies_are_histograms_of_the_row_timestamps():
    series = store()
    Series.objects.filter(pk=series.pk).update(
        status="complete", first_received_at=at(0), last_received_at=at(2), completed_at=at(7)
    )
    job = InferenceJob.objects.create(
        series=series, series_revision=1, task="cxr2d", mode="per_series", status="succeeded"
    )
    InferenceJob.objects.filter(pk=job.pk).update(
        created_at=at(7.2), queued_at=at(7.2), started_at=at(8), finished_at=at(70)
    )
    destination = DicomNode.objects.create(name="pacs", ae_title="PACS", host="127.0.0.1")
    OutboxItem.objects.create(
        job=job, destination=destination, kind="sr", sop_instance_uid="1.2.3",
        file_path="x.dcm", status="sent", sent_at=at(73),
    )  # fmt: skip

    metrics = scrape()

    def bucket(stage: str, le: str) -> float:
        return metrics[("pacs_ai_stage_latency_seconds_bucket", (("le", le), ("stage", stage)))]

    def total(stage: str) -> float:
        return metrics[("pacs_ai_stage_latency_seconds_sum", (("stage", stage),))]

    assert (bucket("complete", "5.0"), bucket("complete", "10.0")) == (0, 1)
    assert total("complete") == pytest.approx(7)
    assert bucket("queued", "0.5") == 1
    assert total("queued") == pytest.approx(0.2)
    assert (bucket("started", "0.5"), bucket("started", "1.0")) == (0, 1)
    assert (bucket("inferred", "60.0"), bucket("inferred", "120.0")) == (0, 1)
    assert total("inferred") == pytest.approx(62)
    assert (bucket("exported", "2.5"), bucket("exported", "5.0")) == (0, 1)
    for stage in ("complete", "queued", "started", "inferred", "exported"):
        assert bucket(stage, "+Inf") == 1
        assert metrics[("pacs_ai_stage_latency_seconds_count", (("stage", stage),))] == 1


def test_a_job_queued_again_after_a_failure_is_not_counted_as_started():
    series = store()
    job = InferenceJob.objects.create(
        series=series, series_revision=1, task="cxr2d", mode="per_series", status="queued"
    )
    InferenceJob.objects.filter(pk=job.pk).update(queued_at=at(100), started_at=at(10))

    metrics = scrape()

    assert metrics[("pacs_ai_stage_latency_seconds_count", (("stage", "started"),))] == 0


def test_metrics_hold_no_patient_data():
    store(PatientName="Doe^Jane")

    body = Client().get("/metrics").content.decode()

    assert "SECRET-PID-77" not in body
    assert "Doe" not in body


def test_a_metrics_token_when_set_is_required_as_a_bearer_token(settings):
    settings.METRICS_TOKEN = "scrape-me"

    assert Client().get("/metrics").status_code == 401
    wrong = Client().get("/metrics", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"].startswith("Bearer")
    assert ("pacs_ai_instances_received_total", ()) in scrape(Authorization="Bearer scrape-me")


def test_metrics_are_read_only():
    assert Client().post("/metrics").status_code == 405

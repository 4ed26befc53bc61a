"""Routing complete series to jobs, and recovering jobs whose queue message was lost."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone
from pydicom.uid import DigitalXRayImageStorageForPresentation

from inference import services
from inference.models import InferenceJob, RoutingRule
from studies import services as studies_services
from tests.factories import encode, make_dataset

pytestmark = pytest.mark.django_db


def store_series(count: int = 1, **tags):
    first = make_dataset(**tags)
    for number in range(count):
        ds = make_dataset(
            StudyInstanceUID=first.StudyInstanceUID,
            SeriesInstanceUID=first.SeriesInstanceUID,
            InstanceNumber=number + 1,
            **tags,
        )
        instance = studies_services.instance_store(data=encode(ds), calling_ae="A")
    return instance.series


@pytest.mark.parametrize(
    ("tags", "task"),
    [
        ({"Modality": "DX", "BodyPartExamined": "CHEST",
          "SOPClassUID": DigitalXRayImageStorageForPresentation}, "cxr2d"),
        ({"Modality": "CR", "BodyPartExamined": ""}, "cxr2d"),
        ({"Modality": "CT", "BodyPartExamined": "CHEST"}, "ct3d"),
    ],
)  # fmt: skip
def test_default_rules_route_chest_series(tags, task, django_capture_on_commit_callbacks):
    series = store_series(**tags)

    with django_capture_on_commit_callbacks() as callbacks:
        job = services.series_route(series=series)

    assert job is not None
    assert (job.task, job.mode, job.status) == (task, "per_series", "queued")
    assert job.series_revision == series.revision
    assert len(callbacks) == 1  # the queue message goes out only after the row is committed


@pytest.mark.parametrize(
    "tags", [{"Modality": "MR"}, {"Modality": "CT", "BodyPartExamined": "HEAD"}]
)
def test_other_series_are_not_routed(tags):
    assert services.series_route(series=store_series(**tags)) is None
    assert not InferenceJob.objects.exists()


def test_a_rule_can_select_by_description_and_view(django_capture_on_commit_callbacks):
    RoutingRule.objects.create(
        name="lateral", priority=1, modalities="DX", view_positions="LL",
        series_description_regex="lat", task="cxr2d", mode="per_slice",
    )  # fmt: skip
    lateral = store_series(Modality="DX", ViewPosition="LL", SeriesDescription="Chest LAT")
    frontal = store_series(Modality="DX", ViewPosition="PA", SeriesDescription="Chest PA")

    assert getattr(services.series_route(series=lateral), "mode", None) == "per_slice"
    assert getattr(services.series_route(series=frontal), "mode", None) == "per_series"


def test_lost_jobs_are_sent_again_once(settings, django_capture_on_commit_callbacks):
    series = store_series(Modality="CT", BodyPartExamined="CHEST")
    queued = services.series_route(series=series)
    running = services.series_route(series=series)
    assert queued is not None
    assert running is not None
    assert services.job_claim(job_id=running.pk) is not None
    assert services.job_claim(job_id=running.pk) is None  # a second delivery does not run it
    later = timezone.now() + dt.timedelta(seconds=settings.INFERENCE_HARD_TIME_LIMIT + 3600)

    with django_capture_on_commit_callbacks() as callbacks:
        recovered = services.jobs_recover(now=later)

    assert sorted(recovered) == sorted([queued.pk, running.pk])
    assert len(callbacks) == 2
    assert services.jobs_recover(now=later) == []
    assert InferenceJob.objects.get(pk=running.pk).status == "queued"


def test_a_job_that_keeps_losing_its_worker_is_failed_not_resent(
    settings, django_capture_on_commit_callbacks
):
    series = store_series(Modality="CT", BodyPartExamined="CHEST")
    job = services.series_route(series=series)
    assert job is not None
    InferenceJob.objects.filter(pk=job.pk).update(
        status="running", started_at=timezone.now(), attempts=settings.INFERENCE_MAX_ATTEMPTS
    )
    later = timezone.now() + dt.timedelta(seconds=settings.INFERENCE_HARD_TIME_LIMIT + 3600)

    with django_capture_on_commit_callbacks() as callbacks:
        assert services.jobs_recover(now=later) == []

    assert callbacks == []
    job.refresh_from_db()
    assert job.status == "failed"
    assert "worker was lost" in job.error

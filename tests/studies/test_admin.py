"""The ingest admin: lists, filters and search work, with a bounded number of queries."""

from __future__ import annotations

import pytest
from django.urls import reverse

from studies import services
from studies.models import AssociationLog, Instance, Series
from tests.factories import encode, make_dataset

pytestmark = pytest.mark.django_db


@pytest.fixture
def stored():
    first = make_dataset(AccessionNumber="ACC-42", PatientID="PID-42")
    for number in range(1, 6):
        ds = make_dataset(
            StudyInstanceUID=first.StudyInstanceUID,
            SeriesInstanceUID=first.SeriesInstanceUID,
            AccessionNumber="ACC-42",
            PatientID="PID-42",
            InstanceNumber=number,
        )
        services.instance_store(data=encode(ds), calling_ae="MODALITY")
    services.instance_store(data=encode(make_dataset(Modality="CR")), calling_ae="OTHER")
    return first


@pytest.mark.parametrize(
    ("model", "query"),
    [
        ("patient", {"q": "PID-42"}),
        ("study", {"q": "ACC-42"}),
        ("series", {"modality": "CT", "status__exact": "receiving"}),
        ("series", {"q": "PID-42"}),
        ("instance", {"q": "ACC-42"}),
        ("instance", {"series__modality": "CT"}),
        ("associationlog", {}),
        ("dicomnode", {}),
    ],
)
def test_changelists_filter_and_search(
    admin_client, stored, django_assert_max_num_queries, model, query
):
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse(f"admin:studies_{model}_changelist"), query)
    assert response.status_code == 200


def test_searching_by_accession_number_finds_the_study_instances(admin_client, stored):
    response = admin_client.get(reverse("admin:studies_instance_changelist"), {"q": "ACC-42"})

    assert response.context["cl"].result_count == 5


def test_the_series_page_shows_status_and_revision(admin_client, stored):
    series = Series.objects.get(series_instance_uid=stored.SeriesInstanceUID)

    response = admin_client.get(reverse("admin:studies_series_change", args=[series.pk]))

    assert response.status_code == 200
    assert b"receiving" in response.content


def test_the_association_log_is_read_only(admin_client):
    log = AssociationLog.objects.create(
        calling_ae="X",
        called_ae="PACS_AI",
        started_at="2026-01-01T00:00Z",
        ended_at="2026-01-01T00:01Z",
        outcome="released",
    )
    assert admin_client.get(reverse("admin:studies_associationlog_add")).status_code == 403
    response = admin_client.post(
        reverse("admin:studies_associationlog_delete", args=[log.pk]), {"post": "yes"}
    )
    assert response.status_code == 403
    assert AssociationLog.objects.filter(pk=log.pk).exists()
    assert Instance.objects.count() == 0

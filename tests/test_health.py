"""``/api/health/`` and ``/api/ready/``, as a monitor and a load balancer see them: no login,
503 only when nothing can be stored or served, and nothing in them but ok/not ok and counts."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder
from rest_framework.test import APIClient

from tests.conftest import free_port, wait_for


def get(url: str):
    return APIClient().get(url)


@pytest.mark.django_db
def test_without_a_worker_health_is_degraded_but_answers_200():
    response = get("/api/health/")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["database"] == {"ok": True}
    assert body["broker"] == {"ok": True}
    assert body["workers"] == {"ok": False, "count": 0}
    assert body["disk"]["ok"] is True
    assert body["disk"]["free_bytes"] > body["disk"]["min_free_bytes"]


@pytest.mark.timeout(120)
def test_with_a_live_worker_health_is_ok(celery_worker):
    def healthy():
        body = get("/api/health/").json()
        return body if body["status"] == "ok" else None

    body = wait_for(healthy, timeout=60, interval=0.5)

    assert body["workers"] == {"ok": True, "count": 1}


@pytest.mark.django_db
def test_a_full_disk_fails_health_with_503(settings):
    settings.DICOM_MIN_FREE_DISK_MB = 1 << 40  # an exabyte

    response = get("/api/health/")

    assert response.status_code == 503
    assert response.json()["status"] == "failing"
    assert response.json()["disk"]["ok"] is False


@pytest.mark.django_db
def test_an_unreachable_broker_is_reported_quickly_as_degraded(monkeypatch, settings):
    settings.HEALTH_BROKER_TIMEOUT = 1.0
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()

    response = get("/api/health/")

    assert time.monotonic() - started < 10
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["broker"] == {"ok": False}
    assert body["workers"]["count"] == 0
    assert "127.0.0.1" not in response.content.decode()


@pytest.mark.django_db
def test_ready_answers_without_login_and_says_nothing_more():
    response = get("/api/ready/")

    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


@pytest.mark.django_db
def test_not_ready_while_a_migration_is_unapplied():
    recorder = MigrationRecorder(connection)
    app, name = max(
        (app, name) for app, name in recorder.applied_migrations() if app == "inference"
    )
    recorder.record_unapplied(app, name)  # rolled back with the test's transaction

    response = get("/api/ready/")

    assert response.status_code == 503
    assert response.json() == {"status": "not ready"}

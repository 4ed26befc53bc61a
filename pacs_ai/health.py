"""``/api/health/`` and ``/api/ready/``: for monitoring and load balancers, without authentication.

Health answers 503 when the database or the DICOM storage disk fails (nothing can be stored
then) and 200 otherwise; an unreachable broker or no live worker makes it "degraded": results
can still be read, but new work waits. Readiness answers 200 once every migration is applied and
the database answers. Neither says more than ok/not ok and counts: no host names, no errors.

A health check takes about HEALTH_WORKER_PING_TIMEOUT seconds (it waits for every worker's
answer); probe readiness, which is quick, from load balancers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from drf_spectacular.utils import OpenApiExample, extend_schema, inline_serializer
from kombu.exceptions import OperationalError
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from pacs_ai.celery import app
from studies.storage import free_disk_bytes

logger = logging.getLogger(__name__)

OK, DEGRADED, FAILING = "ok", "degraded", "failing"


def database_ok() -> bool:
    """Whether the database answers ``SELECT 1``."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return bool(cursor.fetchone() == (1,))
    except DatabaseError as exc:
        logger.warning("health: database check failed: %s", type(exc).__name__)
        return False


def broker_ok() -> bool:
    """Whether a connection to the Celery broker opens within HEALTH_BROKER_TIMEOUT seconds."""
    timeout = settings.HEALTH_BROKER_TIMEOUT
    try:
        with app.connection_for_write(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=math.ceil(timeout))
    except (OperationalError, OSError) as exc:
        logger.warning("health: broker check failed: %s", type(exc).__name__)
        return False
    return True


def live_workers() -> int:
    """How many Celery workers answer a ping within HEALTH_WORKER_PING_TIMEOUT seconds."""
    try:
        return len(app.control.ping(timeout=settings.HEALTH_WORKER_PING_TIMEOUT) or [])
    except (OperationalError, OSError) as exc:
        logger.warning("health: worker ping failed: %s", type(exc).__name__)
        return 0


def disk_free() -> int | None:
    """Free bytes on the DICOM storage disk; None if it cannot be read."""
    try:
        return free_disk_bytes()
    except OSError as exc:
        logger.warning("health: disk check failed: %s", type(exc).__name__)
        return None


def health() -> dict[str, Any]:
    """Every check's result and the overall status (ok, degraded or failing)."""
    minimum = settings.DICOM_MIN_FREE_DISK_MB * 1024 * 1024
    free = disk_free()
    checks: dict[str, dict[str, Any]] = {
        "database": {"ok": database_ok()},
        "broker": {"ok": broker_ok()},
        "disk": {"ok": free is not None and free >= minimum, "free_bytes": free,
                 "min_free_bytes": minimum},
    }  # fmt: skip
    workers = live_workers() if checks["broker"]["ok"] else 0
    checks["workers"] = {"ok": workers > 0, "count": workers}
    if not (checks["database"]["ok"] and checks["disk"]["ok"]):
        overall = FAILING
    elif not (checks["broker"]["ok"] and checks["workers"]["ok"]):
        overall = DEGRADED
    else:
        overall = OK
    return {"status": overall, **checks}


def ready() -> bool:
    """Whether the database answers and has every migration applied."""
    if not database_ok():
        return False
    try:
        executor = MigrationExecutor(connection)
        return not executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as exc:
        logger.warning("ready: migration check failed: %s", type(exc).__name__)
        return False


HEALTH_STATUSES = [OK, DEGRADED, FAILING]
READY_STATUSES = ["ready", "not ready"]

_check = inline_serializer("Check", {"ok": serializers.BooleanField()})
_health = inline_serializer(
    "Health",
    {
        "status": serializers.ChoiceField(choices=HEALTH_STATUSES),
        "database": _check,
        "broker": _check,
        "workers": inline_serializer(
            "Workers", {"ok": serializers.BooleanField(), "count": serializers.IntegerField()}
        ),
        "disk": inline_serializer(
            "Disk",
            {
                "ok": serializers.BooleanField(),
                "free_bytes": serializers.IntegerField(allow_null=True),
                "min_free_bytes": serializers.IntegerField(),
            },
        ),
    },
)
_ready = inline_serializer("Ready", {"status": serializers.ChoiceField(choices=READY_STATUSES)})


class _Unauthenticated(APIView):
    authentication_classes = ()
    permission_classes = (AllowAny,)
    throttle_classes = ()


class HealthApi(_Unauthenticated):
    @extend_schema(
        summary="Health of the database, broker, workers and storage disk (no authentication)",
        auth=[],
        responses={200: _health, 503: _health},
        examples=[
            OpenApiExample(
                "Degraded: no worker answers",
                value={
                    "status": DEGRADED,
                    "database": {"ok": True},
                    "broker": {"ok": True},
                    "workers": {"ok": False, "count": 0},
                    "disk": {"ok": True, "free_bytes": 52428800000, "min_free_bytes": 1073741824},
                },
                response_only=True,
            )
        ],
    )
    def get(self, request: Request) -> Response:
        report = health()
        failing = report["status"] == FAILING
        return Response(
            report,
            status=status.HTTP_503_SERVICE_UNAVAILABLE if failing else status.HTTP_200_OK,
        )


class ReadyApi(_Unauthenticated):
    @extend_schema(
        summary="Ready to serve: database reachable and migrated (no authentication)",
        auth=[],
        responses={200: _ready, 503: _ready},
        examples=[OpenApiExample("Ready", value={"status": "ready"}, response_only=True)],
    )
    def get(self, request: Request) -> Response:
        if ready():
            return Response({"status": "ready"})
        return Response({"status": "not ready"}, status=status.HTTP_503_SERVICE_UNAVAILABLE)

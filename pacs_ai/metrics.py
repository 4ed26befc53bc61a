"""Prometheus metrics at ``/metrics``, computed from the database on each scrape.

The rows are the truth every process shares (web, listener, workers on other hosts), so one
scrape of any web process sees the whole installation and no counter is lost on a restart.

Access: open when ``METRICS_TOKEN`` is empty (scrape from a trusted network only); otherwise
Prometheus must send ``Authorization: Bearer <METRICS_TOKEN>`` (``authorization: {credentials:
...}`` in its scrape config). ``METRICS_TOKEN_FILE`` may hold the token instead.

Metrics (no patient data, no identifiers):

- ``pacs_ai_instances_received_total``: DICOM instances stored (rows).
- ``pacs_ai_instances_refused_total``: instances refused over all associations.
- ``pacs_ai_series{status}``: series receiving or complete.
- ``pacs_ai_jobs{status}``: inference jobs by status; ``status="queued"`` is the queue depth,
  ``status="failed"`` the jobs that failed for good (until re-queued).
- ``pacs_ai_outbox_items{status}``: DICOM result objects queued, sent or failed.
- ``pacs_ai_stage_latency_seconds{stage}``: how long each step took, over every row so far:
  ``complete`` first instance received → series complete; ``queued`` series complete → its
  first job created; ``started`` job queued → a worker started it; ``inferred`` started →
  predictions saved; ``exported`` predictions saved → DICOM result sent.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery, Sum
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from inference.models import InferenceJob, OutboxItem
from studies.models import AssociationLog, Instance, Series

BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def stage_rows() -> dict[str, QuerySet[Any]]:
    """For each stage, the rows that went through it, each with its ``latency`` annotated."""
    first_job = (
        InferenceJob.objects.filter(series=OuterRef("pk"), created_at__gte=OuterRef("completed_at"))
        .order_by("created_at")
        .values("created_at")[:1]
    )
    return {
        "complete": Series.objects.filter(completed_at__isnull=False).annotate(
            latency=F("completed_at") - F("first_received_at")
        ),
        "queued": Series.objects.annotate(first_job=Subquery(first_job))
        .filter(first_job__isnull=False)
        .annotate(latency=F("first_job") - F("completed_at")),
        "started": InferenceJob.objects.filter(
            queued_at__isnull=False, started_at__gte=F("queued_at")
        ).annotate(latency=F("started_at") - F("queued_at")),
        "inferred": InferenceJob.objects.filter(
            status=InferenceJob.Status.SUCCEEDED,
            started_at__isnull=False,
            finished_at__isnull=False,
        ).annotate(latency=F("finished_at") - F("started_at")),
        "exported": OutboxItem.objects.filter(
            status=OutboxItem.Status.SENT, sent_at__isnull=False, job__finished_at__isnull=False
        ).annotate(latency=F("sent_at") - F("job__finished_at")),
    }


def latency_histogram(rows: QuerySet[Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative bucket counts (``+Inf`` last) and the sum in seconds of ``rows``' latency."""
    found = rows.aggregate(
        count=Count("pk"),
        total=Sum("latency"),
        **{
            f"le{index}": Count("pk", filter=Q(latency__lte=dt.timedelta(seconds=bound)))
            for index, bound in enumerate(BUCKETS)
        },
    )
    buckets = [(str(bound), float(found[f"le{index}"])) for index, bound in enumerate(BUCKETS)]
    buckets.append(("+Inf", float(found["count"])))
    total: dt.timedelta | None = found["total"]
    return buckets, total.total_seconds() if total is not None else 0.0


def _by_status(name: str, documentation: str, rows: QuerySet[Any], choices: Any) -> Metric:
    gauge = GaugeMetricFamily(name, documentation, labels=["status"])
    counts = dict(rows.order_by().values_list("status").annotate(n=Count("pk")))
    for value in choices.values:
        gauge.add_metric([value], counts.get(value, 0))
    return gauge


class DatabaseCollector(Collector):
    """Reads every metric from the database when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pacs_ai_instances_received",
            "DICOM instances stored.",
            value=Instance.objects.count(),
        )
        refused = AssociationLog.objects.aggregate(n=Sum("instances_failed"))["n"]
        yield CounterMetricFamily(
            "pacs_ai_instances_refused",
            "DICOM instances refused over all associations.",
            value=refused or 0,
        )
        yield _by_status("pacs_ai_series", "Series by status.", Series.objects.all(), Series.Status)
        yield _by_status(
            "pacs_ai_jobs",
            "Inference jobs by status; queued is the queue depth.",
            InferenceJob.objects.all(),
            InferenceJob.Status,
        )
        yield _by_status(
            "pacs_ai_outbox_items",
            "DICOM result objects by status.",
            OutboxItem.objects.all(),
            OutboxItem.Status,
        )
        histogram = HistogramMetricFamily(
            "pacs_ai_stage_latency_seconds",
            "Seconds each step of a study's way took (see pacs_ai.metrics).",
            labels=["stage"],
        )
        for stage, rows in stage_rows().items():
            buckets, total = latency_histogram(rows)
            histogram.add_metric([stage], buckets, total)
        yield histogram


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(DatabaseCollector())


def _authorised(request: HttpRequest) -> bool:
    token: str = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), token.encode()
    )


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus' text format; 401 without the token when one is set."""
    if not _authorised(request):
        return HttpResponse(
            "A bearer token is required.\n",
            status=401,
            content_type="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)

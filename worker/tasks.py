"""Celery tasks: thin wrappers that take ids and call services."""

from __future__ import annotations

from celery import shared_task

from studies.services import series_sweep


@shared_task(soft_time_limit=60, time_limit=90, ignore_result=True)
def sweep_series() -> list[int]:
    """Periodic: mark quiet series complete (see ``studies.services.series_sweep``)."""
    return series_sweep()

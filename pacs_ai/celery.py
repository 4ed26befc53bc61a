"""The Celery app ``pacs_ai``: ``celery -A pacs_ai worker -B -Q default,inference``."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacs_ai.settings")

app = Celery("pacs_ai")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["worker"])

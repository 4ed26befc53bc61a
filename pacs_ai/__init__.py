"""pacs-ai: a hospital integration service for imaging AI (not for diagnostic use)."""

from __future__ import annotations

from pacs_ai.celery import app as celery_app

__all__ = ["celery_app"]

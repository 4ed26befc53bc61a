from __future__ import annotations

from django.apps import AppConfig


class PacsAiConfig(AppConfig):
    name = "pacs_ai"
    verbose_name = "pacs-ai"

    def ready(self) -> None:
        from pacs_ai import checks  # noqa: F401  (registers the system checks)

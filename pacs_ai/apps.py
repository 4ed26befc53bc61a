from __future__ import annotations

from django.apps import AppConfig


class PacsAiConfig(AppConfig):
    name = "pacs_ai"
    verbose_name = "pacs-ai"

    def ready(self) -> None:
        from pydicom import config as pydicom_config

        from pacs_ai import checks  # noqa: F401  (registers the system checks)

        # pydicom's warnings about invalid values quote the values, patient names included, and
        # files are stored as received anyway: don't validate on read, so nothing is quoted.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

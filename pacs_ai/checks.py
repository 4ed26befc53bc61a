"""System checks: misconfiguration is reported with an id at start-up, not as a stack trace."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured


@register()
def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    try:
        secret_key = settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses an empty key on first use
        secret_key = ""
    if not secret_key:
        messages.append(
            Error(
                "DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) is not set.",
                hint="Production has no default secret; generate one and put it in the env file.",
                id="pacs_ai.E001",
            )
        )
    data_dir = Path(settings.PACS_AI_DATA_DIR)
    if not os.access(data_dir, os.W_OK):
        messages.append(
            Error(
                f"PACS_AI_DATA_DIR {data_dir} is not writable by this process.",
                id="pacs_ai.E002",
            )
        )
    messages.extend(_check_tls())
    ae = settings.DICOM_AE_TITLE
    if not (0 < len(ae) <= 16) or not ae.isascii() or "\\" in ae or not ae.isprintable():
        messages.append(
            Error(
                f"DICOM_AE_TITLE {ae!r} is not a valid AE title.",
                hint="1 to 16 printable ASCII characters, no backslash.",
                id="pacs_ai.E004",
            )
        )
    quiet = settings.SERIES_QUIET_SECONDS
    if "*" not in quiet or any(value < 0 for value in quiet.values()):
        messages.append(
            Error(
                "SERIES_QUIET_SECONDS needs a '*' default and no negative values.",
                hint="For example CR=5,DX=5,CT=30,*=15",
                id="pacs_ai.E005",
            )
        )
    if not settings.EMBEDDED and settings.DICOM_ACCEPT_ALL:
        messages.append(
            Warning(
                "DICOM_ACCEPT_ALL is on: any calling AE may store studies.",
                hint="Use it for first-time set-up only; then add DicomNode rows and turn it off.",
                id="pacs_ai.W001",
            )
        )
    if not settings.EMBEDDED and settings.DEBUG:
        messages.append(
            Warning("DJANGO_DEBUG is on in a production deployment.", id="pacs_ai.W002")
        )
    return messages


def _check_tls() -> list[CheckMessage]:
    cert, key, ca = settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY, settings.DICOM_TLS_CA
    if not (cert or key or ca):
        return []
    if not (cert and key):
        return [
            Error(
                "DICOM TLS needs both DICOM_TLS_CERT and DICOM_TLS_KEY.",
                id="pacs_ai.E003",
            )
        ]
    return [
        Error(f"DICOM TLS file {path} does not exist or is not readable.", id="pacs_ai.E003")
        for path in (cert, key, ca)
        if path and not os.access(path, os.R_OK)
    ]

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from studies.listener import Listener, tls_context

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run the DICOM listener (C-ECHO and C-STORE SCP) that a PACS sends studies to."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=settings.DICOM_PORT)
        parser.add_argument("--host", default=settings.DICOM_BIND)

    def handle(self, *args: Any, **options: Any) -> None:
        context = tls_context()
        logger.info(
            "DICOM listener %s on %s:%s%s (accept all callers: %s)",
            settings.DICOM_AE_TITLE,
            options["host"],
            options["port"],
            " with TLS" if context else "",
            settings.DICOM_ACCEPT_ALL,
        )
        Listener().serve(host=options["host"], port=options["port"], ssl_context=context)

"""``manage.py install_shipped_models``: register the models kept in the repository."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from inference.services import ShippedModelError, shipped_models_install


class Command(BaseCommand):
    help = (
        "Register the models shipped with pacs-ai (inference/shipped_models) that are not "
        "registered yet, and activate each one whose task has no active model. Safe to run "
        "on every start: versions already registered, activated or retired are left alone."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            outcome = shipped_models_install()
        except ShippedModelError as error:
            raise CommandError(str(error)) from error
        for model, action in outcome:
            self.stdout.write(f"{model.name} {model.version} ({model.task}): {action}")

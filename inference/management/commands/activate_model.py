"""``manage.py activate_model NAME VERSION``: make a registered model version active."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from inference.models import ModelVersion
from inference.selectors import active_models
from inference.services import model_version_activate


def activate(
    *, model_version: ModelVersion, ensemble: bool, weight: float | None = None
) -> list[ModelVersion]:
    """Activate ``model_version`` (with ``weight`` as its ensemble weight, if given).

    Returns the versions of its task that this retired: none with ``ensemble``, else every
    other version that was active.
    """
    with transaction.atomic():
        retired = (
            []
            if ensemble
            else list(active_models(task=model_version.task).exclude(pk=model_version.pk))
        )
        if weight is not None:
            model_version.ensemble_weight = weight
            model_version.save(update_fields=["ensemble_weight"])
        model_version_activate(model_version=model_version, ensemble=ensemble)
    return retired


def describe_activation(model_version: ModelVersion, retired: list[ModelVersion]) -> str:
    """What an activation did, in the words the commands print."""
    active = active_models(task=model_version.task)
    lines = [
        f"Activated {model_version.name} {model_version.version} for {model_version.task}.",
        "Active now: "
        + ", ".join(f"{m.name} {m.version} (weight {m.ensemble_weight:g})" for m in active)
        + ".",
        "Retired: " + (", ".join(f"{m.name} {m.version}" for m in retired) or "none") + ".",
    ]
    return "\n".join(lines)


class Command(BaseCommand):
    help = (
        "Make a registered model version the active model of its task; the task's other "
        "active versions retire, unless --ensemble adds it to them (their probabilities are "
        "averaged by --weight)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("version")
        parser.add_argument(
            "--ensemble",
            action="store_true",
            help="Keep the task's other active versions; average with them.",
        )
        parser.add_argument(
            "--weight", type=float, help="This version's weight in an ensemble (default: as is)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name, version, weight = options["name"], options["version"], options["weight"]
        if weight is not None and not weight > 0:
            raise CommandError(f"--weight must be positive, not {weight:g}.")
        model_version = ModelVersion.objects.filter(name=name, version=version).first()
        if model_version is None:
            known = list(
                ModelVersion.objects.filter(name=name)
                .order_by("pk")
                .values_list("version", flat=True)
            )
            raise CommandError(
                f"No model version {name} {version} is registered"
                + (f"; versions of {name}: {', '.join(known)}." if known else ".")
            )
        retired = activate(model_version=model_version, ensemble=options["ensemble"], weight=weight)
        self.stdout.write(describe_activation(model_version, retired))

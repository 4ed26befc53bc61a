from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "AI results (not for diagnostic use)"

    def ready(self) -> None:
        # The role groups (radiologist, integrator) exist on every installation after migrate,
        # so an administrator only has to put people in them.
        post_migrate.connect(_create_roles, sender=self)


def _create_roles(**kwargs: Any) -> None:
    from inference.api.permissions import ensure_roles

    ensure_roles()

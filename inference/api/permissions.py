"""Who may do what through the API: roles are Django groups, checked by name.

- ``radiologist``: read studies, series, jobs, predictions, heatmaps and reports.
- ``integrator``: the same reads, and re-run series and re-queue failed jobs.
- administrators: everything, including activating model versions. An administrator is a
  superuser or holds the Django permission the admin site asks for the same action
  (``inference.change_modelversion`` to activate, ``inference.change_inferencejob`` to re-queue,
  ``inference.view_prediction`` to read). ``is_staff`` alone grants nothing here: radiologists
  are staff, so that they can review in the admin.

Any authenticated user may read the model registry; anonymous requests get 401.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.models import Group
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

RADIOLOGIST = "radiologist"
INTEGRATOR = "integrator"
ROLES = (RADIOLOGIST, INTEGRATOR)


def ensure_roles() -> None:
    """Make sure the role groups exist (idempotent), so administrators can assign them."""
    for name in ROLES:
        Group.objects.get_or_create(name=name)


class _HasRole(BasePermission):
    """Allows authenticated users in one of ``roles`` or holding ``permission``."""

    roles: ClassVar[tuple[str, ...]] = ()
    permission: ClassVar[str]

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not user.is_authenticated:
            return False
        if user.has_perm(self.permission):  # always true for an active superuser
            return True
        return bool(self.roles) and user.groups.filter(name__in=self.roles).exists()


class CanReadResults(_HasRole):
    roles = (RADIOLOGIST, INTEGRATOR)
    permission = "inference.view_prediction"


class CanRunJobs(_HasRole):
    roles = (INTEGRATOR,)
    permission = "inference.change_inferencejob"


class IsAdministrator(_HasRole):
    permission = "inference.change_modelversion"

"""``manage.py ensure_admin``: the first admin account, made once, so a fresh install can log in."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from pacs_ai.env import env_secret, env_str


class Command(BaseCommand):
    help = (
        "Create a superuser if there is none: PACS_AI_ADMIN_USER (default admin) with the password "
        "from PACS_AI_ADMIN_PASSWORD or PACS_AI_ADMIN_PASSWORD_FILE, else a generated one that "
        "is printed once. Does nothing when a superuser exists."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        with transaction.atomic():
            if user_model.objects.filter(is_superuser=True).exists():
                self.stdout.write("An admin account (superuser) exists already; none created.")
                return
            username = env_str("PACS_AI_ADMIN_USER") or "admin"
            if user_model.objects.filter(username=username).exists():
                raise CommandError(
                    f"A user named {username!r} exists but is not a superuser; "
                    "set PACS_AI_ADMIN_USER to another name."
                )
            password = env_secret("PACS_AI_ADMIN_PASSWORD")
            generated = not password
            if generated:
                password = secrets.token_urlsafe(18)
            try:
                validate_password(password, user_model(username=username))
            except ValidationError as exc:
                # The messages describe the password's weakness; they never repeat it.
                raise CommandError(
                    "PACS_AI_ADMIN_PASSWORD is too weak: " + " ".join(exc.messages)
                ) from None
            user_model.objects.create_superuser(username=username, email="", password=password)
        if generated:
            self.stdout.write(
                f"Created the admin account {username!r} with the password\n\n"
                f"    {password}\n\n"
                "Write it down, it is not shown again (change it in the admin, under Users)."
            )
        else:
            self.stdout.write(
                f"Created the admin account {username!r} with the password from "
                "PACS_AI_ADMIN_PASSWORD."
            )

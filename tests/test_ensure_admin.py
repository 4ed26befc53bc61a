"""``manage.py ensure_admin``: the first login of a fresh install."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db

PASSWORD = "tulip-gantry-quiver-41"


@pytest.fixture(autouse=True)
def admin_env(monkeypatch):
    for name in (
        "PACS_AI_ADMIN_USER",
        "PACS_AI_ADMIN_PASSWORD",
        "PACS_AI_ADMIN_PASSWORD_FILE",
    ):
        monkeypatch.delenv(name, raising=False)


def ensure_admin() -> str:
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    return out.getvalue()


def test_it_creates_the_admin_with_the_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("PACS_AI_ADMIN_PASSWORD", PASSWORD)

    output = ensure_admin()

    admin = User.objects.get()
    assert (admin.username, admin.is_superuser, admin.is_staff) == ("admin", True, True)
    assert admin.check_password(PASSWORD)
    assert PASSWORD not in output


def test_the_password_may_come_from_a_file_and_the_user_name_from_the_environment(
    monkeypatch, tmp_path
):
    secret = tmp_path / "admin_password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("PACS_AI_ADMIN_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("PACS_AI_ADMIN_USER", "radadmin")

    ensure_admin()

    assert User.objects.get(username="radadmin").check_password(PASSWORD)


def test_a_generated_password_is_printed_once_and_works():
    output = ensure_admin()

    shown = re.findall(r"^    (\S+)$", output, re.MULTILINE)
    assert len(shown) == 1
    assert len(shown[0]) >= 20
    assert "not shown again" in output
    assert User.objects.get(username="admin").check_password(shown[0])
    assert shown[0] not in ensure_admin()


def test_a_second_run_changes_nothing(monkeypatch):
    monkeypatch.setenv("PACS_AI_ADMIN_PASSWORD", PASSWORD)
    ensure_admin()
    monkeypatch.setenv("PACS_AI_ADMIN_PASSWORD", "another-password-entirely-7")
    monkeypatch.setenv("PACS_AI_ADMIN_USER", "someone")

    output = ensure_admin()

    assert "exists already" in output
    assert list(User.objects.values_list("username", flat=True)) == ["admin"]
    assert User.objects.get().check_password(PASSWORD)


def test_a_weak_password_is_refused_without_repeating_it(monkeypatch):
    monkeypatch.setenv("PACS_AI_ADMIN_PASSWORD", "admin123")

    with pytest.raises(CommandError, match="too weak") as excinfo:
        ensure_admin()

    assert "admin123" not in str(excinfo.value)
    assert not User.objects.exists()

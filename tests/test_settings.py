"""Settings come from the environment; mistakes are reported by system checks with ids."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from pacs_ai import env
from pacs_ai.checks import check_settings
from tests.conftest import ROOT


def test_a_secret_can_come_from_a_file(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("SOME_PASSWORD_FILE", str(secret))

    assert env.env_secret("SOME_PASSWORD") == "s3cret"


@pytest.mark.parametrize(
    ("helper", "value"),
    [(env.env_int, "twelve"), (env.env_bool, "maybe"), (env.env_float, "1,5")],
)
def test_a_malformed_value_names_the_variable(monkeypatch, helper, value):
    monkeypatch.setenv("DICOM_PORT", value)

    with pytest.raises(ImproperlyConfigured, match="DICOM_PORT"):
        helper("DICOM_PORT", 1)


def test_quiet_periods_parse_per_modality(monkeypatch):
    monkeypatch.setenv("SERIES_QUIET_SECONDS", "cr=5, CT=30,*=15")

    assert env.env_mapping("SERIES_QUIET_SECONDS", "") == {"CR": 5, "CT": 30, "*": 15}


def ids(settings) -> set[str | None]:
    return {message.id for message in check_settings(None)}


def test_a_clean_configuration_passes_the_checks(settings):
    assert ids(settings) == set()


def test_half_a_tls_configuration_is_an_error(settings, tmp_path):
    settings.DICOM_TLS_CERT = str(tmp_path / "cert.pem")
    settings.DICOM_TLS_KEY = ""
    assert "pacs_ai.E003" in ids(settings)


@pytest.mark.parametrize("ae", ["", "A_TITLE_THAT_IS_TOO_LONG", "BACK\\SLASH"])
def test_a_bad_ae_title_is_an_error(settings, ae):
    settings.DICOM_AE_TITLE = ae
    assert "pacs_ai.E004" in ids(settings)


def test_quiet_periods_need_a_default(settings):
    settings.SERIES_QUIET_SECONDS = {"CT": 30}
    assert "pacs_ai.E005" in ids(settings)


def test_accept_all_in_production_is_warned_about(settings):
    settings.EMBEDDED = False
    settings.DICOM_ACCEPT_ALL = True
    assert "pacs_ai.W001" in ids(settings)


def test_production_settings_refuse_to_start_without_a_secret(tmp_path):
    environment = {
        **os.environ,
        "PACS_AI_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none",
    }
    environment.pop("DJANGO_SECRET_KEY", None)

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode != 0
    assert "pacs_ai.E001" in result.stderr

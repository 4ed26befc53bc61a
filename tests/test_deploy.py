"""The deployment files: each loads, and every command they run exists in this project."""

from __future__ import annotations

import configparser
import importlib
import re
import shlex
from typing import Any

import pytest
import yaml
from django.core.management import get_commands

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
QUEUES = {"default", "inference"}
VENV_BIN = "/opt/pacs-ai/.venv/bin/"


def check_command(argv: list[str]) -> None:
    """Fail unless ``argv`` runs something this project provides, with arguments it accepts."""
    program, *args = argv
    program = program.removeprefix(VENV_BIN)
    if program == "sh":
        assert args[0] == "-c"
        for part in args[1].split("&&"):
            check_command(shlex.split(part.strip().removeprefix("exec ")))
    elif program == "python":
        assert args[0] == "manage.py"
        assert args[1] in get_commands(), f"manage.py {args[1]} does not exist"
    elif program == "celery":
        assert args[:2] == ["-A", "pacs_ai"]
        assert args[2] in ("worker", "beat")
        importlib.import_module("pacs_ai.celery")
        if "-Q" in args:
            queues = set(args[args.index("-Q") + 1].split(","))
            assert queues <= QUEUES | {"%i"}, queues
    elif program == "gunicorn":
        module, _, attribute = args[0].partition(":")
        assert hasattr(importlib.import_module(module), attribute)
    else:
        pytest.fail(f"unknown program {program!r} in {argv}")


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return services


@pytest.mark.parametrize("name", sorted(compose_services()))
def test_every_compose_service_runs_a_project_command(name):
    service = compose_services()[name]
    if "command" not in service or service.get("image", "").split(":")[0] in ("redis", "postgres"):
        assert service["image"].split(":")[0] in ("redis", "postgres")
        return
    check_command(service["command"])


def test_compose_gives_inference_workers_a_gpu_and_the_inference_queue():
    inference = compose_services()["inference"]
    devices = inference["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert inference["command"][inference["command"].index("-Q") + 1] == "inference"


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_every_systemd_unit_runs_a_project_command(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    assert service["EnvironmentFile"] == "/etc/pacs-ai/pacs-ai.env"
    for key in ("ExecStartPre", "ExecStart"):
        if key in service:
            for line in service[key].splitlines():
                check_command(shlex.split(line))


def test_every_variable_of_the_env_template_is_documented():
    readme = (ROOT / "README.md").read_text()
    template = (DEPLOY / "pacs-ai.env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", template, re.MULTILINE)
    assert names
    for name in names:
        assert f"`{name.removesuffix('_FILE')}" in readme, f"{name} is not in the README"


def test_an_unknown_command_is_caught():
    with pytest.raises(AssertionError):
        check_command(["python", "manage.py", "no_such_command"])

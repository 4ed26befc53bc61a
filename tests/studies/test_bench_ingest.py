"""``manage.py bench_ingest`` on a tiny workload, and how it finds DCMTK's programs."""

from __future__ import annotations

import os
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from studies.bench import dcmtk
from tests.conftest import database_url, requires_dcmtk

pytestmark = requires_dcmtk


def test_dcmtk_programs_are_found_past_same_named_scripts_earlier_on_path(tmp_path, monkeypatch):
    # pynetdicom installs a Python storescu beside the interpreter, first on an activated PATH.
    scripts = tmp_path / "venv-bin"
    scripts.mkdir()
    (scripts / "storescu").write_text("#!/bin/sh\nexit 1\n")
    (scripts / "storescu").chmod(0o755)
    monkeypatch.setenv("PATH", f"{scripts}{os.pathsep}{os.environ['PATH']}")

    found = Path(dcmtk("storescu"))

    assert found.name == "storescu"
    assert found.parent != scripts
    assert found.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.timeout(300)
def test_a_tiny_benchmark_checks_every_instance_and_prints_ratios_and_the_disk_floor(
    transactional_db, monkeypatch, settings
):
    if not settings.EMBEDDED:  # the listener it starts stores into this test's database
        monkeypatch.setenv("DATABASE_URL", database_url())
    out = StringIO()

    call_command(
        "bench_ingest", "--rounds", "1", "--ct-slices", "4", "--dx-images", "2", stdout=out
    )

    tables = out.getvalue().split("\n\n")
    ratios, floor = tables[-2].splitlines(), tables[-1].splitlines()
    assert ratios[0].endswith("target")
    assert floor[0].startswith("workload floor")
    assert [line.split()[0] for line in ratios[1:]] == ["CT", "DX", "CT"]
    assert ">= 0.30: " in ratios[1]
    assert ">= 0.70: " in ratios[2]
    assert [line.split()[0] for line in floor[1:]] == ["CT", "DX"]

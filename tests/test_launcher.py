"""``pacs-ai run``, as ``make run`` starts it: a real launcher with its four children."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from inference.services import SHIPPED_MODELS_DIR
from studies.listener import VERIFICATION
from tests.conftest import ROOT, free_port, wait_for
from tests.factories import CR_JPEG

PASSWORD = "lantern-orbit-sable-58"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from the parent ids in /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces or parentheses: the fields follow the last ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """True unless the process is gone or a zombie waiting for its parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def launcher_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """This environment, less what would point the launcher at the tests' database or files."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "CELERY_BROKER_URL", "DICOM_STORAGE_DIR"}
    }
    env.update(
        PACS_AI_DATA_DIR=str(data_dir),
        DICOM_BIND="127.0.0.1",
        PACS_AI_ADMIN_PASSWORD=PASSWORD,
        PYTHONUNBUFFERED="1",
        **overrides,
    )
    return env


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http on loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def store(port: int, path: Path) -> int | None:
    ds = dcmread(path)
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AI")
    if not assoc.is_established:
        return None
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status) if "Status" in status else None


def predictions(database: Path) -> list[tuple[str, str, str]]:
    """(status, model name, label) of each prediction the service wrote, read-only."""
    if not database.exists():
        return []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        query = "SELECT status, model_name, label FROM inference_prediction"
        return list(connection.execute(query))


def echo(port: int) -> int | None:
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AI")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_it_starts_every_process_prints_the_addresses_and_stops_them_all_on_sigterm(
    tmp_path: Path,
) -> None:
    web_port, dicom_port = free_port(), free_port()
    env = launcher_env(
        tmp_path / "data", WEB_BIND=f"127.0.0.1:{web_port}", DICOM_PORT=str(dicom_port)
    )
    log_path = tmp_path / "launcher.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    with log_path.open("wb") as log_file:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai.launcher", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    children: set[int] = set()
    try:

        def started() -> bool:
            assert launcher.poll() is None, f"the launcher exited early:\n{log()[-4000:]}"
            return "pacs-ai is running" in log()

        wait_for(started, timeout=120)
        children = descendants(launcher.pid)
        commands = " | ".join(cmdline(pid) for pid in children)
        for part in ("gunicorn pacs_ai.wsgi", "dicom_listener", "pacs_ai beat", "pacs_ai worker"):
            assert part in commands

        assert http_status(f"http://127.0.0.1:{web_port}/admin/login/") == 200
        assert echo(dicom_port) == 0x0000
        # Out of the box, the shipped model classifies a radiograph the PACS sends.
        assert store(dicom_port, CR_JPEG) == 0x0000
        database = tmp_path / "data" / "pacs_ai.sqlite3"
        ((status, model_name, label),) = wait_for(lambda: predictions(database), timeout=120)
        (card,) = (json.loads(p.read_text()) for p in SHIPPED_MODELS_DIR.glob("*/model_card.json"))
        assert (status, model_name) == ("analysed", card["name"])
        assert label in card["classes"]
        output = log()
        assert f"http://127.0.0.1:{web_port}/admin/" in output
        assert f"AE title PACS_AI, host 127.0.0.1, port {dicom_port}" in output
        assert str(tmp_path / "data") in output
        assert PASSWORD not in output

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0, log()[-4000:]
        wait_for(lambda: not any(running(pid) for pid in children), timeout=10)
        assert http_status(f"http://127.0.0.1:{web_port}/admin/login/") is None
    finally:
        if launcher.poll() is None:
            children |= descendants(launcher.pid)
            launcher.kill()
            launcher.wait()
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_it_stops_the_others_and_fails_when_a_child_dies(tmp_path: Path) -> None:
    """A DICOM port that is taken kills the listener: the launcher must not run on without it."""
    web_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = launcher_env(
            tmp_path / "data",
            WEB_BIND=f"127.0.0.1:{web_port}",
            DICOM_PORT=str(taken.getsockname()[1]),
        )
        result = subprocess.run(
            [sys.executable, "-m", "pacs_ai.launcher", "run"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert result.returncode == 1
    assert "The DICOM listener" in result.stderr
    assert "stopping the others" in result.stderr
    assert http_status(f"http://127.0.0.1:{web_port}/admin/login/") is None

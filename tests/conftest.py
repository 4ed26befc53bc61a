"""Fixtures: a live DICOM listener on a free port and a real Celery worker process.

``make test`` points PACS_AI_DATA_DIR at a fresh temporary folder, so stored files, the test
database (SQLite) and the embedded queue never touch a real installation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from studies.bench import dcmtk_installed

ROOT = Path(__file__).resolve().parent.parent

requires_dcmtk = pytest.mark.skipif(
    not dcmtk_installed(), reason="DCMTK is not installed (apt-get install dcmtk)"
)


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def storage_dir(settings: Any, tmp_path: Path) -> Iterator[Path]:
    """Each test stores DICOM files and registers models in folders of its own, removed after
    it: a registered model is two copies of its weights (90 to 270 MB for these networks)."""
    settings.DICOM_STORAGE_DIR = tmp_path / "dicom"
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"
    yield Path(settings.DICOM_STORAGE_DIR)
    for folder in (settings.DICOM_STORAGE_DIR, settings.INFERENCE_MODELS_DIR):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def listener(transactional_db: None, settings: Any) -> Iterator[int]:
    """A running DICOM listener on 127.0.0.1 that accepts any caller; yields its port."""
    from studies.listener import Listener

    settings.DICOM_ACCEPT_ALL = True
    port = free_port()
    server = Listener().serve(host="127.0.0.1", port=port, block=False)
    try:
        yield port
    finally:
        server.shutdown()


def database_url() -> str:
    """The URL of the database the tests use, for processes started by tests."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def worker_env(transactional_db: None, tmp_path: Path) -> dict[str, str]:
    """Environment for a process that must share this test's database, queue and files."""
    connection.close()  # SQLite: let the other process see a settled file
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        PACS_AI_DATA_DIR=str(settings.PACS_AI_DATA_DIR),
        DICOM_STORAGE_DIR=str(settings.DICOM_STORAGE_DIR),
        INFERENCE_MODELS_DIR=str(settings.INFERENCE_MODELS_DIR),
        SERIES_QUIET_SECONDS="CR=1,DX=1,CT=2,*=2",
        SERIES_SWEEP_INTERVAL="0.5",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_worker(
    env: dict[str, str], folder: Path, *, name: str = "worker"
) -> subprocess.Popen[bytes]:
    """Start a real ``celery -A pacs_ai worker -B`` process, as production runs it.

    It leads a process group of its own (pool and beat included), logging to ``folder/<name>.log``.
    """
    with (folder / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "pacs_ai",
                "worker",
                "-B",
                "-Q",
                "default,inference",
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
                "--schedule",
                str(folder / f"{name}-beat-schedule"),
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(process: subprocess.Popen[bytes], folder: Path, *, name: str = "worker") -> None:
    """Stop a worker from ``start_worker`` (warm shutdown, then SIGKILL) and show its log's tail."""
    if process.poll() is None:
        # The main process alone: it stops its pool and beat; a SIGTERM to a pool process makes
        # the pool start a new one and can stall the shutdown.
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    sys.stdout.write((folder / f"{name}.log").read_text(errors="replace")[-4000:])


@pytest.fixture
def celery_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery -A pacs_ai worker -B`` process, as production runs it."""
    process = start_worker(worker_env, tmp_path)
    try:
        yield process
    finally:
        stop_worker(process, tmp_path)

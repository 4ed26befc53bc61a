"""``pacs-ai run``: the whole service on one host, as ``make run`` starts it.

Checks the settings, migrates the database, collects static files and makes sure an admin
account exists; then runs the web server (gunicorn), the DICOM listener, the scheduler (celery
beat) and one worker as child processes, prints where they can be reached, and watches them.
When a child exits on its own the others are stopped and the launcher exits 1; SIGINT, SIGTERM
or SIGHUP stops them all and it exits 0. Hosts of a larger deployment run the same commands
one by one (see ``deploy/``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connections

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0  # seconds for the web server and the listener to accept connections
STOP_GRACE = 30.0  # seconds from SIGTERM to SIGKILL: time for a worker to finish its task
POLL_INTERVAL = 0.2


def child_commands() -> dict[str, list[str]]:
    """The four processes of a single host, by name; the venv's interpreter runs each."""
    python, level = sys.executable, settings.LOG_LEVEL
    celery = [python, "-m", "celery", "-A", "pacs_ai"]
    return {
        "web server": [
            python, "-m", "gunicorn", "pacs_ai.wsgi:application", "--bind", settings.WEB_BIND,
            "--workers", "2", "--threads", "4", "--graceful-timeout", "20",
            "--log-level", level.lower(), "--no-control-socket",
        ],
        "DICOM listener": [python, "-m", "django", "dicom_listener"],
        "scheduler": [
            *celery, "beat", "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
            "--loglevel", level,
        ],
        "worker": [
            *celery, "worker", "-Q", "default,inference", "--concurrency", "1",
            "--loglevel", level, "--without-mingle", "--without-gossip",
        ],
    }  # fmt: skip


def host_port(bind: str, *, name: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        raise ImproperlyConfigured(f"{name} must look like HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)


def all_interfaces(host: str) -> bool:
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


def reachable_host(host: str) -> str:
    """The name other hosts use for a bind address; all interfaces means this host's name."""
    if not all_interfaces(host):
        return host
    name = socket.getfqdn()
    return socket.gethostname() if name.startswith("localhost") else name


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("localhost" if all_interfaces(host) else host, port), 1):
            return True
    except OSError:
        return False


def banner() -> str:
    """Where to reach the service; settings only, never patient data."""
    web_host, web_port = host_port(settings.WEB_BIND, name="WEB_BIND")
    web = reachable_host(web_host)
    web = f"[{web}]" if ":" in web else web
    queue = (
        "embedded (in the data directory)"
        if settings.CELERY_BROKER_URL.startswith("filesystem")
        else "CELERY_BROKER_URL"
    )
    return "\n".join(
        [
            "",
            "pacs-ai is running. AI results are not for diagnostic use.",
            f"  web UI and admin  http://{web}:{web_port}/admin/  (bound to {settings.WEB_BIND})",
            f"  DICOM listener    AE title {settings.DICOM_AE_TITLE}, host "
            f"{reachable_host(settings.DICOM_BIND)}, port {settings.DICOM_PORT} "
            f"(bound to {settings.DICOM_BIND})",
            f"  data directory    {settings.PACS_AI_DATA_DIR}",
            f"  worker            running, queues default and inference; queue {queue}",
            "  scheduler         running (series sweep)",
            "Stop with Ctrl-C (or SIGTERM).",
            "",
            "",
        ]
    )


class Supervisor:
    """Child processes, each in a session of its own so that only the launcher gets Ctrl-C."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_signal: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def start(self, commands: dict[str, list[str]]) -> None:
        for name, argv in commands.items():
            logger.info("starting the %s: %s", name, " ".join(argv))
            self.children[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def watch(self, probes: dict[str, tuple[str, int]]) -> int:
        """Return 0 on a stop signal, 1 when a child exits or a port stays closed too long.

        Prints the banner once every probed port accepts connections.
        """
        waiting = dict(probes)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.stop_signal is None:
            for name, process in self.children.items():
                code = process.poll()
                if code is not None:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
                    logger.error("The %s (pid %s) %s; stopping the others.", name, process.pid, how)
                    return 1
            if waiting:
                for name, (host, port) in list(waiting.items()):
                    if accepts_connections(host, port):
                        del waiting[name]
                if not waiting:
                    sys.stdout.write(banner())
                    sys.stdout.flush()
                elif time.monotonic() > deadline:
                    logger.error(
                        "The %s did not accept connections within %.0f s; stopping.",
                        " and the ".join(waiting),
                        STARTUP_TIMEOUT,
                    )
                    return 1
            time.sleep(POLL_INTERVAL)
        logger.info("%s received; stopping.", signal.Signals(self.stop_signal).name)
        return 0

    def stop(self) -> None:
        """SIGTERM to every child, then SIGKILL to the process group of any still running."""
        for process in self.children.values():
            process.send_signal(signal.SIGTERM)  # a no-op for a child already reaped
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(
            process.poll() is None for process in self.children.values()
        ):
            time.sleep(POLL_INTERVAL)
        for name, process in self.children.items():
            if process.poll() is None:
                logger.warning("The %s did not stop within %.0f s; killing it.", name, STOP_GRACE)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run() -> int:
    call_command("check")
    call_command("migrate", interactive=False)
    call_command("collectstatic", interactive=False, verbosity=0)
    call_command("ensure_admin")
    call_command("install_shipped_models")
    connections.close_all()
    probes = {
        "web server": host_port(settings.WEB_BIND, name="WEB_BIND"),
        "DICOM listener": (settings.DICOM_BIND, settings.DICOM_PORT),
    }
    supervisor = Supervisor()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, supervisor.on_signal)
    try:
        supervisor.start(child_commands())
        return supervisor.watch(probes)
    finally:
        supervisor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs-ai", description="pacs-ai on one host")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run", help="set up, then run web server, DICOM listener, scheduler and worker"
    )
    parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacs_ai.settings")
    try:
        django.setup()
        return run()
    except (CommandError, ImproperlyConfigured) as exc:
        sys.stderr.write(f"pacs-ai: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())

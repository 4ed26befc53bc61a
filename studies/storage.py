"""Where DICOM files live on disk, and how they get there without ever being half-written.

A file is first written in full to ``.incoming/`` under the storage root, flushed to disk, and
then renamed into ``<study>/<series>/<instance>.dcm``: a reader sees the old file or the new one,
never part of one. Nothing under ``.incoming/`` was ever acknowledged to a peer. Once a file is
in place its pages leave the page cache: the listener streams far more than memory holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from django.conf import settings

# A DICOM UID: digits in dot-separated components, at most 64 characters (PS3.5 9.1). Nothing
# else can reach a path, so no tag value can climb out of the storage directory.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
INCOMING = ".incoming"


class InvalidUID(ValueError):
    pass


def sanitise_uid(value: object) -> str:
    """Return the UID with DICOM padding removed, or raise InvalidUID if it is not a UID."""
    uid = str(value or "").strip("\x00 ")
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise InvalidUID(f"not a valid DICOM UID ({len(uid)} characters)")
    return uid


def storage_root() -> Path:
    return Path(settings.DICOM_STORAGE_DIR)


def instance_relpath(*, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The path of an instance under the storage root; arguments must be sanitised UIDs."""
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def free_disk_bytes() -> int:
    root = storage_root()
    try:
        return shutil.disk_usage(root).free
    except FileNotFoundError:
        root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(root).free


class IncomingFile:
    """A file under ``.incoming/`` being received: written, flushed, then moved into place by
    ``commit_incoming`` or dropped by ``discard``."""

    def __init__(self) -> None:
        folder = storage_root() / INCOMING
        try:
            fd, path = tempfile.mkstemp(dir=folder, suffix=".part")
        except FileNotFoundError:  # the first file ever: make the folder once
            _make_folder(folder)
            fd, path = tempfile.mkstemp(dir=folder, suffix=".part")
        self.fd: int | None = fd
        self.path = Path(path)
        self.size = self._queued = 0  # bytes written; bytes queued for write-back

    def write(self, data: bytes | memoryview) -> None:
        if self.fd is None:
            raise ValueError("the incoming file is closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)
        if self.size - self._queued >= _WRITEBACK_CHUNK and settings.DICOM_FSYNC:
            # Start writing what has arrived while the rest is still on the network: the
            # flush at the end then waits for the last chunk only.
            _dont_need(self.fd, self._queued, self.size - self._queued)
            self._queued = self.size

    def flush(self) -> Future[None]:
        """Close the file, in a background thread after flushing its data to disk (unless
        ``DICOM_FSYNC`` is off), so that parsing and indexing overlap the disk write."""
        fd, self.fd = self.fd, None
        if fd is None:
            raise ValueError("the incoming file is closed")
        return _flusher.submit(_flush_and_close, fd)

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)


def _flush_and_close(fd: int) -> None:
    try:
        if settings.DICOM_FSYNC:
            _fdatasync(fd)  # the data and the size, not the access times: all a reader needs
    finally:
        os.close(fd)


_fdatasync = getattr(os, "fdatasync", os.fsync)
_WRITEBACK_CHUNK = 1 << 20


def _dont_need(fd: int, offset: int, length: int) -> None:
    """On Linux, POSIX_FADV_DONTNEED queues the write-back of dirty pages (dropping none of
    them) and drops clean ones; elsewhere, nothing."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# Each association waits for at most one flush and one placement at a time; the threads start
# on demand. Placements have their own: one waits on a flush, which must never wait for a free
# thread.
_flusher = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fdatasync")
_placer = ThreadPoolExecutor(max_workers=16, thread_name_prefix="place")


def commit_incoming(*, flushed: Future[None], tmp: Path, relpath: str) -> Future[None]:
    """Once ``tmp`` is flushed, atomically move it to its final place and make the rename
    durable, in a background thread: the caller indexes the instance meanwhile."""
    return _placer.submit(_place, flushed, tmp, storage_root() / relpath)


def _place(flushed: Future[None], tmp: Path, final: Path) -> None:
    flushed.result()  # the file's data is on disk before its name is
    try:
        os.replace(tmp, final)
    except FileNotFoundError:  # the series' first instance: make its folder once
        _make_folder(final.parent)
        os.replace(tmp, final)
    _fsync_folder(final.parent)
    if settings.DICOM_FSYNC:
        _flusher.submit(_drop_cached, final)  # nobody waits for it


def _drop_cached(path: Path) -> None:
    """Drop a durable file's pages from the page cache. A PACS sends far more than memory
    holds, and the worker reads each file once, later; the freed pages go to the next
    instance. Pages the kernel must find afresh cost more than the disk: on the benchmark's
    VM, writing 8 MB into new pages took 13-14 ms, into freed ones about 2 ms."""
    with contextlib.suppress(OSError):  # only advice: a file replaced or deleted meanwhile
        fd = os.open(path, os.O_RDONLY)  # the flush closed its own: parsing read on after it
        try:
            _dont_need(fd, 0, 0)
        finally:
            os.close(fd)


def remove_stale_incoming(*, older_than_s: float) -> int:
    """Delete incoming files left by a process that died mid-transfer; return how many."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in (storage_root() / INCOMING).glob("*.part"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _make_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each durably (its parent fsynced)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    if not settings.DICOM_FSYNC:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

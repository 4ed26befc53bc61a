"""Where DICOM files live on disk, and how they get there without ever being half-written."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from django.conf import settings

# A DICOM UID: digits in dot-separated components, at most 64 characters (PS3.5 9.1). Nothing
# else can reach a path, so no tag value can climb out of the storage directory.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


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
    root.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(root).free


def write_temp(*, relpath: str, data: bytes | memoryview) -> Path:
    """Write ``data`` to a temporary file beside its final place and flush it to disk."""
    folder = (storage_root() / relpath).parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".part")
    except FileNotFoundError:  # the series' first instance: make its folder once
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if settings.DICOM_FSYNC:
                _fdatasync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


# Flushes the data and the size, not the access times: all a reader needs after a crash.
_fdatasync = getattr(os, "fdatasync", os.fsync)


def commit_temp(*, tmp: Path, relpath: str) -> None:
    """Atomically move a file from ``write_temp`` to its final place and make the rename durable."""
    final = storage_root() / relpath
    os.replace(tmp, final)
    if settings.DICOM_FSYNC:
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

"""The parts of ``manage.py bench_ingest``: synthetic workloads, the two receivers, storescu.

Only the benchmark imports this module; the listener and the web process never do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from django.conf import settings
from django.core.management.base import CommandError
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

MANAGE_PY = Path(settings.BASE_DIR) / "manage.py"
CALLING_AE = "BENCH_SCU"
READY_TIMEOUT_S = 60.0


@dataclass
class Workload:
    """Part 10 files to send, one batch per association, marked by their accession number."""

    name: str
    accession: str
    batches: list[list[Path]]
    sop_uids: list[str]
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.sop_uids)


def ct_series(
    folder: Path, *, name: str, accession: str, slices: int, batches: int, rng: np.random.Generator
) -> Workload:
    """One CT series of 512x512 16-bit slices in one study, split into ``batches`` batches."""
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for number in range(1, slices + 1):
        ds = synthetic_image(
            sop_class=CTImageStorage,
            modality="CT",
            patient_id=accession,
            accession=accession,
            study_uid=study_uid,
            series_uid=series_uid,
            number=number,
            pixels=rng.integers(0, 4096, (512, 512), dtype=np.uint16),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = [0, 0, number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        files.append(_write(folder, ds))
    return _workload(name, accession, files, batches)


def dx_images(
    folder: Path, *, name: str, accession: str, images: int, rng: np.random.Generator
) -> Workload:
    """Chest X-rays as a PACS sends them: each 2048x2048 16-bit image its own patient and study."""
    files = []
    for number in range(1, images + 1):
        ds = synthetic_image(
            sop_class=DigitalXRayImageStorageForPresentation,
            modality="DX",
            patient_id=f"{accession}-{number}",
            accession=accession,
            study_uid=generate_uid(),
            series_uid=generate_uid(),
            number=1,
            pixels=rng.integers(0, 4096, (2048, 2048), dtype=np.uint16),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.BodyPartExamined = "CHEST"
        files.append(_write(folder, ds))
    return _workload(name, accession, files, 1)


def synthetic_image(
    *,
    sop_class: UID,
    modality: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    number: int,
    pixels: np.ndarray,
    accession: str = "",
) -> Dataset:
    """A 16-bit greyscale instance with a synthetic patient and fresh SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "BENCH^SYNTHETIC"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "120000", accession
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _write(folder: Path, ds: Dataset) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _workload(name: str, accession: str, files: list[Path], batches: int) -> Workload:
    return Workload(
        name=name,
        accession=accession,
        batches=[files[i::batches] for i in range(batches)],
        sop_uids=[path.stem for path in files],
        nbytes=sum(path.stat().st_size for path in files),
    )


def dcmtk(program: str) -> str:
    """The path of DCMTK's ``program`` (storescu, storescp, echoscu, dsrdump ...).

    pynetdicom installs Python programs named storescu, storescp and echoscu beside the
    interpreter, and an activated virtual environment puts them first on PATH. DCMTK's are
    compiled, so the first match on PATH that is not a script is DCMTK's.
    """
    for folder in os.get_exec_path():
        path = shutil.which(program, path=folder)
        if path is not None:
            with open(path, "rb") as file:
                if file.read(2) != b"#!":
                    return path
    raise FileNotFoundError(f"DCMTK's {program} is not installed (apt-get install dcmtk)")


def dcmtk_installed() -> bool:
    try:
        dcmtk("storescu")
    except FileNotFoundError:
        return False
    return True


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on unless told otherwise; every small PDU then waits
    # for a delayed ACK and a run is about 20 times slower.
    return {**os.environ, "TCP_NODELAY": "1"}


def send(*, port: int, ae_title: str, workload: Workload, log: Path) -> float:
    """Send every batch on its own association at once with storescu; return the wall time."""
    # -xe -R: propose only the SOP classes of the files, explicit VR little endian first.
    command = [dcmtk("storescu"), "-aet", CALLING_AE, "-aec", ae_title, "-xe", "-R"]
    command += ["127.0.0.1", str(port)]
    logs = [log.with_suffix(f".{i}.log") for i in range(len(workload.batches))]
    start = time.perf_counter()
    processes = []
    for batch, path in zip(workload.batches, logs, strict=True):
        with path.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [*command, *map(str, batch)],
                    env=dcmtk_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    codes = [process.wait() for process in processes]
    elapsed = time.perf_counter() - start
    for code, path in zip(codes, logs, strict=True):
        if code != 0:
            raise CommandError(f"storescu exited with {code}: {_tail(path)}")
    return elapsed


class Receiver(Protocol):
    """A storage SCP under test: started once, sent workloads, checked after each."""

    name: str
    ae_title: str
    port: int

    def start(self) -> None: ...

    def verify(self, workload: Workload) -> None: ...

    def stop(self) -> None: ...


class StoreScp:
    """DCMTK's storescp in bit-preserving mode, one forked child per association, no fsync."""

    name = "DCMTK"
    ae_title = "STORESCP"

    def __init__(self, folder: Path) -> None:
        self.out = folder / "storescp"
        self.out.mkdir()
        self.log = folder / "storescp.log"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.sent: list[str] = []

    def start(self) -> None:
        # Its largest receive PDU, so it is not held back by smaller PDUs than our listener gets.
        command = [dcmtk("storescp"), "--fork", "+B", "-pdu", "131072", "-aet", self.ae_title]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "-od", str(self.out), str(self.port)],
                env=dcmtk_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_for_echo(self.process, port=self.port, ae_title=self.ae_title, log=self.log)

    def verify(self, workload: Workload) -> None:
        """Check one file per instance was written (named ``<modality>.<SOP Instance UID>``).

        Files are kept, as our listener's are: deleting them would hand storescp page cache
        that is cheaper to write to than the fresh pages our listener gets.
        """
        self.sent.extend(workload.sop_uids)
        files = sorted(path.name.split(".", 1)[1] for path in self.out.iterdir())
        if files != sorted(self.sent):
            raise CommandError(f"storescp holds {len(files)} files for {len(self.sent)} sent")

    def stop(self) -> None:
        _stop(self.process)


class PacsAiListener:
    """``manage.py dicom_listener`` in a process of its own, on a data directory of its own.

    In the embedded mode it gets a fresh SQLite database there; otherwise it uses the configured
    DATABASE_URL, and ``forget`` deletes the benchmark's rows from it afterwards.
    """

    name = "pacs-ai"
    ae_title = settings.DICOM_AE_TITLE

    def __init__(self, folder: Path) -> None:
        data = folder / "pacs-ai"
        self.storage = data / "dicom"
        self.log = folder / "listener.log"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "PACS_AI_DATA_DIR": str(data),
            "DICOM_STORAGE_DIR": str(self.storage),
            "DICOM_ACCEPT_ALL": "1",
            "DICOM_FSYNC": "1",
            "DICOM_TLS_CERT": "",
        }
        if settings.EMBEDDED:
            self.env.pop("DATABASE_URL", None)

    def start(self) -> None:
        if settings.EMBEDDED:
            self._manage("migrate", "--noinput")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self._manage_command(
                    "dicom_listener", "--host", "127.0.0.1", "--port", str(self.port)
                ),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_for_echo(self.process, port=self.port, ae_title=self.ae_title, log=self.log)

    def verify(self, workload: Workload) -> None:
        """Check the rows are exactly the instances sent, each with its file and no other file."""
        code = (
            "import json; from studies.models import Instance; rows = Instance.objects.filter("
            f"series__study__accession_number={workload.accession!r}); "
            "print(json.dumps(list(rows.values_list('sop_instance_uid', 'file_path'))))"
        )
        rows = json.loads(self._manage("shell", "-c", code).splitlines()[-1])
        uids = [uid for uid, _ in rows]
        if len(uids) != workload.count or set(uids) != set(workload.sop_uids):
            raise CommandError(
                f"{workload.name}: {len(uids)} Instance rows ({len(set(uids))} unique) "
                f"for {workload.count} instances sent"
            )
        studies = {Path(path).parts[0] for _, path in rows}
        files = {
            path.relative_to(self.storage).as_posix()
            for study in studies
            for path in (self.storage / study).rglob("*")
            if path.is_file()
        }
        if files != {path for _, path in rows}:
            raise CommandError(f"{workload.name}: {len(files)} files for {len(rows)} Instance rows")

    def forget(self, tag: str) -> None:
        """Delete the rows of patients whose ID starts with ``tag``, and our association logs."""
        code = (
            "from studies.models import AssociationLog, Patient, Series, Study; "
            f"patients = Patient.objects.filter(patient_id__startswith={tag!r}); "
            "Series.objects.filter(study__patient__in=patients).delete(); "
            "Study.objects.filter(patient__in=patients).delete(); patients.delete(); "
            f"AssociationLog.objects.filter(calling_ae={CALLING_AE!r}).delete()"
        )
        self._manage("shell", "-c", code)

    def stop(self) -> None:
        _stop(self.process)

    def _manage_command(self, *args: str) -> list[str]:
        return [sys.executable, str(MANAGE_PY), *args]

    def _manage(self, *args: str) -> str:
        result = subprocess.run(
            self._manage_command(*args),
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise CommandError(f"manage.py {args[0]} failed: {result.stderr[-2000:]}")
        return result.stdout


class DiskFloor:
    """How fast this disk takes a workload's bytes durably, with nothing else to do: each file
    written to a new file and fdatasynced, its pages dropped from the page cache (as the
    listener does, so that the next file's are not new to the VM), and the folder fsynced once
    at the end. No network, parsing, database or folder fsync per file: a receiver that answers
    each instance only once it is on disk cannot finish sooner. storescp, which does not fsync,
    can."""

    name = "disk floor"

    def __init__(self, folder: Path) -> None:
        self.out = folder / "floor"
        self.out.mkdir()

    def copy(self, workload: Workload) -> float:
        """Write the workload's files durably; return the wall time."""
        target = self.out / workload.accession
        target.mkdir()
        start = time.perf_counter()
        for path in (path for batch in workload.batches for path in batch):
            with (target / path.name).open("xb") as file:
                file.write(path.read_bytes())
                file.flush()
                os.fdatasync(file.fileno())
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        _fsync(target)
        return time.perf_counter() - start


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_echo(
    process: subprocess.Popen[bytes], *, port: int, ae_title: str, log: Path
) -> None:
    """Poll with echoscu until the receiver answers a C-ECHO, or fail at the deadline."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    echo = [
        dcmtk("echoscu"),
        "-to",
        "5",
        "-aet",
        CALLING_AE,
        "-aec",
        ae_title,
        "127.0.0.1",
        str(port),
    ]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CommandError(f"receiver exited with {process.returncode}: {_tail(log)}")
        if subprocess.run(echo, env=dcmtk_env(), capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise CommandError(f"receiver not answering C-ECHO after {READY_TIMEOUT_S:.0f} s: {_tail(log)}")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]

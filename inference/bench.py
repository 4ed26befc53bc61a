"""The parts of ``manage.py bench_inference``: a throwaway installation, random-weight models,
synthetic DICOM stored as real Instance rows, raw ONNX Runtime next to the worker path.

Only the benchmark imports this module; it imports torch and onnxruntime.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from django.conf import settings
from django.core.management.base import CommandError
from pydicom import Dataset, dcmread
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    generate_uid,
)

from inference import preprocessing, services
from inference.models import InferenceJob, Mode, ModelVersion, Prediction, Task
from inference.networks import build_model, export_onnx
from inference.pipeline import job_run
from inference.preprocessing import PreprocessSpec
from inference.runners.onnx import providers
from studies import services as studies_services
from studies.bench import synthetic_image
from studies.models import Instance, Series
from studies.storage import storage_root

Array = npt.NDArray[np.float32]

# Created by the parent in its fresh temporary folder: a child refuses any folder without it.
SANDBOX_MARK = "bench-inference-sandbox"
CALLING_AE = "BENCH_SCU"
LABELS = {Task.CXR2D: ["NORMAL", "PNEUMONIA"], Task.CT3D: ["normal", "pathology"]}
ARCHITECTURES = {Task.CXR2D: "resnet18", Task.CT3D: "r3d_18"}
# Worker and raw ORT probabilities of the same input differ by rounding (ORT's kernels depend on
# the batch size) and by the 6 decimals a Prediction keeps.
PROBABILITY_TOLERANCE = 1e-4

# A fresh process runs one CT job and reports VmHWM (its own peak RSS: ru_maxrss of a child can
# be inherited from the parent that forked it) after its imports and after the job, in kB.
_PEAK_RSS_CODE = """
import sys
import django
django.setup()
from inference.pipeline import job_run
def hwm():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
before = hwm()
job = job_run(job_id=int(sys.argv[1]))
assert job is not None and job.status == "succeeded", job and job.error
print(before, hwm())
"""


def sandbox_env(folder: Path) -> dict[str, str]:
    """The environment of a throwaway installation in ``folder``.

    Its own data directory, hence a fresh SQLite database, model registry, DICOM storage and
    filesystem queue, all inside ``folder``: a configured database, broker or storage of a real
    installation is dropped from the environment. Heatmaps are off (``on_demand``), as in the
    issue's comparison, and ONNX Runtime uses every core in the worker as in the raw reference.
    """
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "pacs_ai.settings",
        "PACS_AI_DATA_DIR": str(folder),
        "DICOM_STORAGE_DIR": str(folder / "dicom"),
        "DICOM_FSYNC": "0",  # storing the inputs is set-up, not measured
        "INFERENCE_GRADCAM": "on_demand",
        "INFERENCE_RUNNER": "onnx",
        "ORT_INTRA_OP_THREADS": "0",
        "LOG_LEVEL": "WARNING",
        "DJANGO_DEBUG": "0",
        "PYTHONUNBUFFERED": "1",
    }
    for name in (
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "DJANGO_SECRET_KEY",
        "DJANGO_SECRET_KEY_FILE",
    ):
        env.pop(name, None)
    return env


def require_sandbox(folder: Path) -> None:
    """Raise CommandError unless this process's database and files all lie in ``folder``,
    a folder the parent benchmark created and marked."""
    root = folder.resolve()
    paths: list[str | Path] = [
        settings.PACS_AI_DATA_DIR,
        str(settings.DATABASES["default"]["NAME"]),
        settings.DICOM_STORAGE_DIR,
        settings.INFERENCE_MODELS_DIR,
        settings.INFERENCE_OUTPUT_DIR,
        settings.CELERY_QUEUE_DIR,
    ]
    outside = [str(p) for p in paths if not Path(p).resolve().is_relative_to(root)]
    if not settings.EMBEDDED or outside or not (root / SANDBOX_MARK).is_file():
        raise CommandError(
            f"refusing to run: {root} is not a sandbox made by bench_inference "
            f"(outside it: {', '.join(outside) or 'none'}; embedded: {settings.EMBEDDED})"
        )


def model_register(*, task: Task, spec: PreprocessSpec, folder: Path) -> ModelVersion:
    """A random-weight network for ``task``, exported to ONNX, registered and made active."""
    torch.manual_seed(0)
    architecture = ARCHITECTURES[task]
    model = build_model(architecture, num_classes=len(LABELS[task])).eval()
    onnx_file, weights_file = folder / f"{task}.onnx", folder / f"{task}.pt"
    export_onnx(model, torch.zeros(1, 1, *spec.size), onnx_file)
    torch.save(model.state_dict(), weights_file)
    version = services.model_version_register(
        name=f"bench-{architecture}",
        version="random-weights",
        task=task,
        architecture=architecture,
        class_labels=LABELS[task],
        positive_label=LABELS[task][1],
        threshold=0.5,
        preprocessing=spec.to_dict(),
        onnx_file=onnx_file,
        weights_file=weights_file,
        model_card={"intended_use": "Benchmark only: random weights. Not for diagnostic use."},
    )
    return services.model_version_activate(model_version=version)


def dx_series(
    *, images: int, per_series: int, size: int, rng: np.random.Generator, tag: str
) -> list[Series]:
    """Store ``images`` chest DX images (``size`` squared, 12 of 16 bits) through
    ``instance_store``, ``per_series`` to a series, each series its own study and patient."""
    series = []
    for first in range(0, images, per_series):
        study_uid, series_uid = generate_uid(), generate_uid()
        for number in range(1, min(per_series, images - first) + 1):
            ds = synthetic_image(
                sop_class=DigitalXRayImageStorageForPresentation,
                modality="DX",
                patient_id=f"{tag}-DX-{first}",
                study_uid=study_uid,
                series_uid=series_uid,
                number=number,
                pixels=rng.integers(0, 4096, (size, size), dtype=np.uint16),
            )
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImagerPixelSpacing = [0.15, 0.15]
            ds.BodyPartExamined = "CHEST"
            instance = _store(ds)
        series.append(instance.series)
    return series


def ct_series(*, slices: int, size: int, rng: np.random.Generator, tag: str) -> Series:
    """Store one axial chest CT series of ``slices`` 16-bit slices (``size`` squared, 1 mm
    apart) that passes the CT quality gate."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(1, slices + 1):
        ds = synthetic_image(
            sop_class=CTImageStorage,
            modality="CT",
            patient_id=f"{tag}-CT",
            study_uid=study_uid,
            series_uid=series_uid,
            number=number,
            pixels=rng.integers(0, 4096, (size, size), dtype=np.uint16),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.ImagePositionPatient = [-179.2, -179.2, float(number)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        instance = _store(ds)
    return instance.series


def _store(ds: Dataset) -> Instance:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return studies_services.instance_store(data=buffer.getvalue(), calling_ae=CALLING_AE)


def series_paths(series: Series) -> list[Path]:
    """The stored files of a series, in the order the worker reads them."""
    instances = series.instances.order_by("instance_number", "pk")
    return [storage_root() / path for path in instances.values_list("file_path", flat=True)]


def positive_probabilities(logits: Array) -> Array:
    """The softmax probability of the positive (second) class for each row of logits."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray(shifted[:, 1] / shifted.sum(axis=-1), np.float32)


class RawOrt:
    """A plain ``InferenceSession`` (default options) on a registered model's ONNX file."""

    def __init__(self, model_version: ModelVersion) -> None:
        path = Path(settings.INFERENCE_MODELS_DIR) / model_version.onnx_path
        self.session = ort.InferenceSession(str(path), providers=providers())
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: Array) -> Array:
        """Logits for a prepared float32 batch."""
        return np.asarray(self.session.run(None, {self.input_name: batch})[0], np.float32)


def radiograph_inputs(series: list[Series], spec: PreprocessSpec) -> Array:
    """The preprocessed model inputs ``[N, 1, H, W]`` of every image of ``series``, in order."""
    return np.stack(
        [
            preprocessing.radiograph_from_dataset(dcmread(path), spec)
            for one in series
            for path in series_paths(one)
        ]
    )


def decode_slices(paths: list[Path]) -> list[npt.NDArray[np.uint16]]:
    """Each file's stored pixel values, read and decoded with pydicom."""
    return [pixel_array(dcmread(path)) for path in paths]


def timed(work: Callable[[], object]) -> float:
    """Seconds ``work`` takes on the wall clock."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def jobs_create(series: list[Series], *, task: Task, mode: Mode) -> list[int]:
    """One queued job per series (the queue message goes to the sandbox's own queue)."""
    return [services.job_create(series=one, task=task, mode=mode).pk for one in series]


def jobs_run(job_ids: list[int]) -> None:
    """Run jobs one after the other in this process, as a worker would."""
    for job_id in job_ids:
        job_run(job_id=job_id)


def jobs_stages(job_ids: list[int]) -> dict[str, float]:
    """Seconds the jobs spent in each pipeline stage, summed, as their predictions record."""
    stages: dict[str, float] = {}
    for job_id in job_ids:
        prediction = Prediction.objects.filter(job_id=job_id).first()
        for stage, seconds in (prediction.timings if prediction else {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return stages


def jobs_check(job_ids: list[int], expected: Array) -> None:
    """Raise CommandError unless every job succeeded with one analysed prediction per expected
    probability (in job then instance order), each matching it within the tolerance."""
    probabilities: list[float] = []
    for job_id in job_ids:
        job = InferenceJob.objects.get(pk=job_id)
        if job.status != InferenceJob.Status.SUCCEEDED:
            raise CommandError(f"job {job_id} ended {job.status}: {job.error}")
        rows = Prediction.objects.filter(job=job).order_by("slice_index", "instance__pk")
        for row in rows:
            if row.status != Prediction.Status.ANALYSED or row.probability is None:
                raise CommandError(f"job {job_id}: not analysed: {row.reason}")
            probabilities.append(row.probability)
    if len(probabilities) != len(expected):
        raise CommandError(f"{len(probabilities)} worker predictions for {len(expected)} inputs")
    worst = float(np.max(np.abs(np.array(probabilities) - expected), initial=0.0))
    if worst > PROBABILITY_TOLERANCE:
        raise CommandError(
            f"worker predictions differ from raw ONNX Runtime's by up to {worst:.2g}"
        )


@dataclass(frozen=True)
class PeakRss:
    """VmHWM of a fresh worker process, in bytes: after its imports, and after one job."""

    after_imports: int
    after_job: int


def peak_rss(job_id: int) -> PeakRss:
    """Run one job in a fresh Python process with this process's settings; its VmHWM."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CODE, str(job_id)],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "pacs_ai.settings"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CommandError(f"peak RSS run failed: {result.stderr[-2000:]}")
    before, after = (int(kb) * 1024 for kb in result.stdout.split()[-2:])
    return PeakRss(after_imports=before, after_job=after)

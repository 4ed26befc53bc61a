"""Inference through a real Celery worker process: images in over DICOM, predictions out, and
what a site sees when a worker dies mid-job or a model file was tampered with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import transaction
from PIL import Image
from pydicom import dcmread

from inference import services
from inference.models import InferenceJob, Prediction, RoutingRule
from studies import services as studies_services
from studies.bench import dcmtk, dcmtk_env
from studies.models import Series
from tests.conftest import ROOT, requires_dcmtk, start_worker, stop_worker, wait_for
from tests.factories import CR_JPEG, CT_SERIES, encode

DONE = (InferenceJob.Status.SUCCEEDED, InferenceJob.Status.FAILED)


@pytest.fixture
def worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The worker draws a heatmap for every prediction, as a site with this setting would."""
    return {**worker_env, "INFERENCE_GRADCAM": "always"}


def storescu(port: int, *args: str | Path) -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "MODALITY", "127.0.0.1", str(port), *map(str, args)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def store(*paths: Path) -> Series:
    """Store files as the listener would, without a network: the worker's sweeper completes it."""
    for path in paths:
        instance = studies_services.instance_store(
            data=encode(dcmread(path)), calling_ae="MODALITY"
        )
    return instance.series


def finished_jobs(count: int) -> list[InferenceJob] | None:
    jobs = list(InferenceJob.objects.filter(status__in=DONE).select_related("series"))
    return jobs if len(jobs) >= count else None


def job_status(job_id: int) -> str | None:
    return InferenceJob.objects.filter(pk=job_id).values_list("status", flat=True).first()


@pytest.mark.timeout(150)
@requires_dcmtk
def test_a_ct_series_and_a_radiograph_sent_by_storescu_get_predictions_with_heatmaps(
    listener, default_routing, register_model, celery_worker, tmp_path
):
    models = {task: register_model(task) for task in ("cxr2d", "ct3d")}
    # The inference worker loaded torch and ONNX Runtime before its pool forked.
    wait_for(
        lambda: "inference stack preloaded" in (tmp_path / "worker.log").read_text(), timeout=30
    )

    storescu(listener, *sorted(CT_SERIES.glob("*.dcm")))
    storescu(listener, "-xy", CR_JPEG)  # JPEG baseline, proposed as it is stored

    jobs = wait_for(lambda: finished_jobs(2), timeout=90)
    assert InferenceJob.objects.count() == 2
    assert {job.series.modality: job.task for job in jobs} == {"CT": "ct3d", "CR": "cxr2d"}
    for job in jobs:
        assert job.status == InferenceJob.Status.SUCCEEDED, job.error
        prediction = Prediction.objects.get(series=job.series)  # one result per series
        assert prediction.job == job
        assert prediction.status == Prediction.Status.ANALYSED
        model = models[job.task]
        assert prediction.label in model.class_labels
        assert prediction.probability is not None
        assert 0.0 <= prediction.probability <= 1.0
        assert (prediction.model_name, prediction.model_version) == (model.name, model.version)
        assert prediction.model_sha256 == model.onnx_sha256
        with Image.open(settings.INFERENCE_OUTPUT_DIR / prediction.heatmap_path) as heatmap:
            assert heatmap.format == "PNG"
    assert Series.objects.get(modality="CT").instances.count() == 30


@pytest.mark.timeout(150)
def test_a_job_whose_worker_is_killed_mid_run_is_sent_again_and_gives_one_result(
    default_routing, register_model, worker_env, celery_worker, tmp_path
):
    register_model("ct3d")
    series = store(*sorted(CT_SERIES.glob("*.dcm")))

    # The sweeper routes the series; the first attempt, Grad-CAM included, runs for seconds.
    job = wait_for(
        lambda: InferenceJob.objects.filter(series=series, status="running").first(),
        timeout=60,
        interval=0.01,
    )
    os.killpg(celery_worker.pid, signal.SIGKILL)
    celery_worker.wait(timeout=10)
    assert job_status(job.pk) == InferenceJob.Status.RUNNING, "the job ended before the kill"

    # A new worker's sweeper sends the job again once it has run past the hard time limit (short
    # here; without Grad-CAM the job, torch import included, takes a third of it on two cores).
    env = {
        **worker_env,
        "INFERENCE_SOFT_TIME_LIMIT": "12",
        "INFERENCE_HARD_TIME_LIMIT": "15",
        "INFERENCE_RECOVER_GRACE": "1",
        "INFERENCE_GRADCAM": "on_demand",
    }
    second = start_worker(env, tmp_path, name="second-worker")
    try:
        wait_for(lambda: job_status(job.pk) in DONE, timeout=60)
    finally:
        stop_worker(second, tmp_path, name="second-worker")

    job.refresh_from_db()
    assert job.status == InferenceJob.Status.SUCCEEDED, job.error
    assert job.attempts == 2
    assert InferenceJob.objects.filter(series=series).count() == 1
    prediction = Prediction.objects.get(series=series)
    assert prediction.job == job
    assert prediction.status == Prediction.Status.ANALYSED


@pytest.mark.timeout(120)
def test_a_tampered_model_fails_its_job_and_a_requeue_after_repair_succeeds(
    register_model, celery_worker
):
    RoutingRule.objects.update(enabled=False)  # this test queues its job by hand
    model = register_model("cxr2d")
    series = store(CR_JPEG)
    model_file = settings.INFERENCE_MODELS_DIR / model.onnx_path
    original = model_file.read_bytes()
    model_file.write_bytes(original + b"\0")

    with transaction.atomic():
        job = services.job_create(series=series, task="cxr2d", mode="per_series")
    wait_for(lambda: job_status(job.pk) in DONE, timeout=60)

    job.refresh_from_db()
    assert job.status == InferenceJob.Status.FAILED
    assert "sha256" in job.error
    assert not Prediction.objects.filter(series=series).exists()

    model_file.write_bytes(original)
    with transaction.atomic():
        assert services.job_requeue(job=job)
    wait_for(lambda: job_status(job.pk) in DONE, timeout=60)

    job.refresh_from_db()
    assert job.status == InferenceJob.Status.SUCCEEDED, job.error
    assert job.error == ""
    prediction = Prediction.objects.get(series=series)
    assert prediction.model_sha256 == model.onnx_sha256
    assert prediction.label in model.class_labels


# The processes that serve the web and the DICOM listener, and what they import.
WEB_AND_LISTENER = [
    "pacs_ai.urls",
    "pacs_ai.wsgi",
    "studies.listener",
    "studies.management.commands.dicom_listener",
    "worker.tasks",
    "inference.services",
    "inference.selectors",
]
IMPORT_CHECK = """
import importlib, importlib.util, json, sys
import django
django.setup()
for name in sys.argv[1:]:
    importlib.import_module(name)
for optional in ("inference.admin", "inference.api", "studies.api"):
    if importlib.util.find_spec(optional) is not None:
        importlib.import_module(optional)
from django.urls import get_resolver
get_resolver().url_patterns
print(json.dumps(sorted(m for m in ("torch", "onnxruntime") if m in sys.modules)))
"""


@pytest.mark.timeout(60)
def test_the_web_process_and_the_listener_never_load_torch_or_onnxruntime():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, *WEB_AND_LISTENER],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "pacs_ai.settings"},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []

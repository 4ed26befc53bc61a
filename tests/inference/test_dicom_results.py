"""A finished job's DICOM results, made from real predictions and read back by DCMTK and pydicom."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from inference import services
from inference.dicom_results import ResultObject, results_write
from inference.models import InferenceJob, Prediction
from inference.pipeline import job_run
from studies import services as studies_services
from studies.bench import dcmtk
from studies.models import Series
from tests.conftest import requires_dcmtk
from tests.factories import CR_JPEG, CT_SERIES, encode

pytestmark = [
    pytest.mark.django_db,
    requires_dcmtk,
]


@pytest.fixture(autouse=True)
def results_settings(settings, tmp_path):
    """Heatmaps for every prediction, and each test's results in a folder of its own."""
    settings.INFERENCE_GRADCAM = "always"
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"


def store(paths: list[Path], **changes: object) -> Series:
    for path in paths:
        ds = dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        instance = studies_services.instance_store(data=encode(ds), calling_ae="MODALITY")
    return instance.series


def finished_job(paths: list[Path], *, task: str, **changes: object) -> InferenceJob:
    """A job run by the real pipeline on stored files, per series."""
    job = services.job_create(series=store(paths, **changes), task=task, mode="per_series")
    job_run(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == "succeeded"
    return job


def dsrdump(path: Path) -> str:
    """dsrdump's full text of an SR file; it must parse it without error."""
    result = subprocess.run(
        [dcmtk("dsrdump"), "+Pl", "+Pu", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def read(result: ResultObject) -> Dataset:
    return dcmread(settings.INFERENCE_OUTPUT_DIR / result.file_path)


def items(content: Dataset) -> Iterator[Dataset]:
    """Every SR content item under ``content``, depth first."""
    for item in content.get("ContentSequence", []):
        yield item
        yield from items(item)


def test_a_radiograph_sr_holds_the_finding_model_and_warning_in_the_original_study(
    register_model,
):
    model = register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    prediction = Prediction.objects.get(job=job)
    source = dcmread(CR_JPEG, stop_before_pixels=True)

    report = next(r for r in results_write(job=job) if r.kind == "sr")

    ds = read(report)
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.SOPInstanceUID == report.sop_instance_uid
    assert ds.StudyInstanceUID == source.StudyInstanceUID == job.series.study.study_instance_uid
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientID, ds.PatientName, ds.PatientSex) == (
        source.PatientID,
        source.PatientName,
        source.PatientSex,
    )
    assert ds.SeriesDescription == "AI result (not for diagnostic use)"
    text = dsrdump(settings.INFERENCE_OUTPUT_DIR / report.file_path)
    assert "not for diagnostic use" in text
    assert f'"Finding")="{prediction.label}"' in text
    assert "tiny-cxr2d" in text
    assert model.onnx_sha256 in text
    probabilities = {
        item.ContentSequence[0].TextValue: float(item.MeasuredValueSequence[0].NumericValue)
        for item in items(ds)
        if item.ValueType == "NUM"
    }
    assert probabilities == pytest.approx(prediction.probabilities, abs=1e-6)


def test_heatmap_boxes_are_polylines_on_the_source_radiograph(register_model):
    register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    prediction = Prediction.objects.get(job=job)
    assert prediction.boxes, "Grad-CAM gave no region to check"
    source = dcmread(CR_JPEG, stop_before_pixels=True)

    report = read(next(r for r in results_write(job=job) if r.kind == "sr"))

    regions = [item for item in items(report) if item.ValueType == "SCOORD"]
    assert len(regions) == len(prediction.boxes)
    for region in regions:
        assert region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, np.float32).reshape(-1, 2)
        assert (points[0] == points[-1]).all()  # closed
        assert (points >= 0).all()
        assert (points[:, 0] <= source.Columns).all()
        assert (points[:, 1] <= source.Rows).all()
        referenced = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_a_box_reaching_past_the_image_is_clipped_to_it(register_model):
    register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    # The letterbox's padding maps outside the image: a box may start left of it.
    Prediction.objects.filter(job=job).update(
        boxes=[{"x": -40, "y": 1000, "width": 100, "height": 100, "score": 0.9}]
    )

    report = read(next(r for r in results_write(job=job) if r.kind == "sr"))

    (region,) = [item for item in items(report) if item.ValueType == "SCOORD"]
    points = np.asarray(region.GraphicData, np.float32).reshape(-1, 2)
    assert points.min(axis=0).tolist() == [0, 1000]
    assert points.max(axis=0).tolist() == [60, 1024]


def test_the_heatmap_capture_is_rgb_with_the_warning_burned_in(register_model):
    register_model("cxr2d")
    job = finished_job([CR_JPEG], task="cxr2d")
    source = dcmread(CR_JPEG, stop_before_pixels=True)

    captures = [r for r in results_write(job=job) if r.kind == "sc"]

    assert len(captures) == 1
    ds = read(captures[0])
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesDescription == "AI heatmap (not for diagnostic use)"
    assert ds.BurnedInAnnotation == "YES"
    assert ds.PhotometricInterpretation == "RGB"
    assert "not for diagnostic use" in ds.ImageComments
    pixels = ds.pixel_array
    assert pixels.shape == (ds.Rows, ds.Columns, 3)
    assert pixels.dtype == np.uint8
    # The 64x64 heatmap, enlarged 8 times, above a black band that carries white text.
    assert ds.Columns == 512
    band = pixels[512:]
    assert band.shape[0] > 20
    assert (band == 255).all(axis=-1).sum() > 200
    assert (band == 0).all(axis=-1).mean() > 0.5


def test_a_ct_gets_its_montage_as_capture_and_regions_as_text(register_model):
    register_model("ct3d")
    job = finished_job(sorted(CT_SERIES.glob("*.dcm")), task="ct3d")
    # A box as the pipeline gives it for a volume: on a salient slice of the model's input grid
    # (the random tiny model's heatmap may have none large enough).
    Prediction.objects.filter(job=job).update(
        boxes=[{"x": 3, "y": 4, "width": 10, "height": 8, "score": 0.8, "slice_index": 5}]
    )

    results = results_write(job=job)

    report, capture = (read(r) for r in sorted(results, key=lambda r: r.kind != "sr"))
    assert (
        report.StudyInstanceUID == capture.StudyInstanceUID == job.series.study.study_instance_uid
    )
    assert not [item for item in items(report) if item.ValueType == "SCOORD"]
    text = dsrdump(settings.INFERENCE_OUTPUT_DIR / results[0].file_path)
    assert '"Selected Region Description")="heatmap slice 5: x 3, y 4, width 10, height 8' in text
    assert '"Finding")="pathology"' in text or '"Finding")="normal"' in text
    # 8 salient slices of 32x32, 4 to a row: a 128x64 montage, enlarged 4 times.
    assert capture.Columns == 512
    assert capture.pixel_array.shape[:2] == (capture.Rows, 512)
    assert capture.PatientOrientation == ["L", "P"]  # axial slices, as the source CT's


def test_a_series_that_was_not_analysed_gets_an_sr_saying_why_and_no_capture():
    job = finished_job([CR_JPEG], task="cxr2d")  # no active model

    results = results_write(job=job)

    assert [r.kind for r in results] == ["sr"]
    text = dsrdump(settings.INFERENCE_OUTPUT_DIR / results[0].file_path)
    assert '"Finding")="not analysed"' in text
    assert "No active model for chest X-ray (2D)" in text
    assert "not for diagnostic use" in text
    assert "No algorithms succeeded" in text


def test_the_patient_module_is_copied_with_its_characters(register_model):
    register_model("cxr2d")
    job = finished_job(
        [CR_JPEG],
        task="cxr2d",
        SpecificCharacterSet="ISO_IR 100",
        PatientName="Müller^Jürgen",
        PatientBirthDate="19500101",
    )

    for result in results_write(job=job):
        ds = read(result)
        assert str(ds.PatientName) == "Müller^Jürgen"
        assert ds.PatientBirthDate == "19500101"

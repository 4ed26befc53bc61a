"""``manage.py infer``: files, folders, zip archives and JPEGs to a report, with no server."""

from __future__ import annotations

import json
import shutil
import zipfile
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from openpyxl import load_workbook
from pydicom import dcmread

from inference import services
from inference.models import Prediction
from inference.pipeline import job_run
from studies import services as studies_services
from tests.factories import CR_JPEG, CT_SERIES, DATA, encode

pytestmark = pytest.mark.django_db

JPEGS = DATA / "cxr" / "kermany-val-fullres"
CT_HEADER = dcmread(sorted(CT_SERIES.glob("*.dcm"))[0], stop_before_pixels=True)
CR_HEADER = dcmread(CR_JPEG, stop_before_pixels=True)


@pytest.fixture
def models(register_model):
    return {task: register_model(task) for task in ("cxr2d", "ct3d")}


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    """A folder of two studies as a CD or an export holds them: the CT series and the CR."""
    folder = tmp_path / "studies"
    shutil.copytree(CT_SERIES, folder / "ct" / "series-1")
    (folder / "cr").mkdir()
    shutil.copy(CR_JPEG, folder / "cr" / "image.dcm")
    return folder


def infer(*args: str, out: Path) -> dict[str, Any]:
    call_command("infer", *args, "--out", str(out), stdout=StringIO())
    batch: dict[str, Any] = json.loads(out.read_text())
    return batch


def by_series(batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["series_uid"]: item for item in batch["items"] if item["slice_index"] is None}


def server_probabilities() -> dict[str, float | None]:
    """What the worker's pipeline gives the same files, by series UID."""
    for paths, task in ((sorted(CT_SERIES.glob("*.dcm")), "ct3d"), ([CR_JPEG], "cxr2d")):
        for path in paths:
            instance = studies_services.instance_store(data=encode(dcmread(path)), calling_ae="X")
        job = services.job_create(series=instance.series, task=task, mode="per_series")
        job_run(job_id=job.pk)
    return {p.series.series_instance_uid: p.probability for p in Prediction.objects.all()}


def test_a_folder_of_studies_gets_the_probabilities_the_server_gives(models, studies, tmp_path):
    out = tmp_path / "report.xlsx"
    stdout = StringIO()

    call_command("infer", str(studies), "--out", str(out), stdout=stdout)

    header, *body = load_workbook(out)["results"].iter_rows(values_only=True)
    assert list(header) == [
        "path_to_study",
        "study_uid",
        "series_uid",
        "probability_of_pathology",
        "pathology",
        "processing_status",
        "time_of_processing",
    ]
    rows = {row[2]: row for row in body}
    assert set(rows) == {CT_HEADER.SeriesInstanceUID, CR_HEADER.SeriesInstanceUID}
    ct, cr = rows[CT_HEADER.SeriesInstanceUID], rows[CR_HEADER.SeriesInstanceUID]
    assert ct[:2] == (str(studies / "ct" / "series-1"), CT_HEADER.StudyInstanceUID)
    assert cr[:2] == (str(studies / "cr"), CR_HEADER.StudyInstanceUID)
    assert all(row[5] == "Success" and row[6] > 0 for row in body)
    expected = server_probabilities()
    for series_uid, row in rows.items():
        assert row[3] == pytest.approx(expected[series_uid], abs=1e-5)
    assert "2 results (2 succeeded, 0 failed)" in stdout.getvalue()


def test_a_zip_archive_of_studies_gives_the_same_results(models, studies, tmp_path):
    archive = tmp_path / "studies.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(studies.rglob("*.dcm")):
            zipped.write(path, path.relative_to(studies).as_posix())
    from_folder = by_series(infer(str(studies), out=tmp_path / "folder.json"))

    from_zip = by_series(infer(str(archive), out=tmp_path / "zip.json"))

    assert set(from_zip) == set(from_folder)
    for series_uid, item in from_zip.items():
        assert (
            item["probability_of_pathology"] == from_folder[series_uid]["probability_of_pathology"]
        )
    assert from_zip[CT_HEADER.SeriesInstanceUID]["path_to_study"] == f"{archive}/ct/series-1"
    assert from_zip[CR_HEADER.SeriesInstanceUID]["filename"] == f"{archive}/cr/image.dcm"


def test_jpeg_images_are_each_analysed_by_the_chest_xray_model(register_model, tmp_path):
    model = register_model("cxr2d")

    batch = infer(str(JPEGS), "--format", "json", out=tmp_path / "report.json")

    assert (batch["count"], batch["succeeded"], batch["failures"]) == (16, 16, 0)
    assert batch["models"] == [{"name": model.name, "version": "1", "sha256": model.onnx_sha256}]
    files = sorted(str(path) for path in JPEGS.rglob("*.jpeg"))
    assert sorted(item["filename"] for item in batch["items"]) == files
    for item in batch["items"]:
        assert item["path_to_study"] == item["filename"]
        assert (item["study_uid"], item["series_uid"]) == ("", "")
        assert item["prediction"] in ("NORMAL", "PNEUMONIA")
        assert item["pathology"] == int(item["prediction"] == "PNEUMONIA")
        assert 0.5 <= item["confidence"] <= 1.0


def test_a_corrupt_file_is_one_failure_and_the_rest_succeed(models, studies, tmp_path):
    (studies / "cr" / "broken.dcm").write_bytes(b"DICM" * 100)
    (studies / "ct" / "series-1" / "truncated.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 10)
    shutil.copy(next(JPEGS.rglob("*.jpeg")), studies / "good.jpeg")

    batch = infer(str(studies), out=tmp_path / "report.json")

    failures = [item for item in batch["items"] if item["processing_status"] == "Failure"]
    assert sorted(Path(item["filename"]).name for item in failures) == [
        "broken.dcm",
        "truncated.jpeg",
    ]
    assert all(item["reason"] for item in failures)
    assert (batch["count"], batch["succeeded"]) == (5, 3)


def test_per_slice_mode_gives_each_ct_slice_its_row(models, studies, tmp_path):
    batch = infer(str(studies / "ct"), "--mode", "per-slice", out=tmp_path / "report.json")

    slices = [item for item in batch["items"] if item["slice_index"] is not None]
    assert [item["slice_index"] for item in slices] == list(range(30))
    assert all(item["mode"] == "per_slice" for item in batch["items"])
    positions = [float(dcmread(item["filename"]).ImagePositionPatient[2]) for item in slices]
    assert positions == sorted(positions)  # feet to head, as the server orders them
    assert batch["count"] == 1


def test_without_an_active_model_a_series_is_a_failure_with_the_reason(
    register_model, studies, tmp_path
):
    register_model("cxr2d")

    items = by_series(infer(str(studies), out=tmp_path / "report.json"))

    assert items[CR_HEADER.SeriesInstanceUID]["processing_status"] == "Success"
    ct = items[CT_HEADER.SeriesInstanceUID]
    assert ct["processing_status"] == "Failure"
    assert "no active model" in ct["reason"].lower()


def test_model_picks_a_registered_version_that_is_not_active(register_model, studies, tmp_path):
    register_model("ct3d", version="1")
    candidate = register_model("ct3d", version="2", activate=False)

    items = by_series(
        infer(str(studies / "ct"), "--model", "tiny-ct3d:2", out=tmp_path / "report.json")
    )

    model = items[CT_HEADER.SeriesInstanceUID]["model"]
    assert (model["version"], model["sha256"]) == ("2", candidate.onnx_sha256)


def test_an_unknown_model_or_a_missing_path_is_refused(models, studies, tmp_path):
    with pytest.raises(CommandError, match="No model version nope"):
        infer(str(studies), "--model", "nope", out=tmp_path / "report.json")
    with pytest.raises(CommandError, match="No such file"):
        infer(str(tmp_path / "absent"), out=tmp_path / "report.json")


def test_the_torch_runner_agrees_and_progress_goes_to_stderr(models, studies, tmp_path, capsys):
    onnx = by_series(infer(str(studies), out=tmp_path / "onnx.json"))

    torch = by_series(infer(str(studies), "--runner", "torch", out=tmp_path / "torch.json"))

    for series_uid, item in torch.items():
        expected = onnx[series_uid]["probability_of_pathology"]
        assert item["probability_of_pathology"] == pytest.approx(expected, abs=1e-4)
    assert torch[CR_HEADER.SeriesInstanceUID]["model"]["sha256"] == models["cxr2d"].weights_sha256
    assert "analysing" in capsys.readouterr().err


def test_dicom_goes_through_the_quality_gate_and_images_skip_it(register_model, tmp_path):
    register_model("cxr2d")
    head = dcmread(CR_JPEG)
    head.BodyPartExamined = "HEAD"
    head.save_as(tmp_path / "head.dcm")
    shutil.copy(next(JPEGS.rglob("*.jpeg")), tmp_path / "chest.jpeg")

    batch = infer(str(tmp_path / "head.dcm"), str(tmp_path / "chest.jpeg"), out=tmp_path / "r.json")

    by_name = {Path(item["filename"]).name: item for item in batch["items"]}
    assert by_name["head.dcm"]["processing_status"] == "Failure"
    assert "body part" in by_name["head.dcm"]["reason"].lower()
    assert by_name["chest.jpeg"]["processing_status"] == "Success"

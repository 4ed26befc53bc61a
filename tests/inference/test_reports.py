"""Reports of real predictions: the Excel columns hospital tools read, JSON, `manage.py report`."""

from __future__ import annotations

import json
from io import BytesIO, StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from openpyxl import load_workbook
from pydicom import dcmread
from pydicom.uid import generate_uid

from inference import reports, services
from inference.models import NOT_FOR_DIAGNOSTIC_USE, InferenceJob, Prediction
from inference.pipeline import job_run
from inference.reports import ReportRow
from studies import services as studies_services
from studies.models import Series
from tests.factories import CR_JPEG, CT_SERIES, encode

pytestmark = pytest.mark.django_db

COLUMNS = [
    "path_to_study",
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "processing_status",
    "time_of_processing",
]
CT_FILES = sorted(CT_SERIES.glob("*.dcm"))


def store(paths, **changes) -> Series:
    for path in paths:
        ds = dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        instance = studies_services.instance_store(data=encode(ds), calling_ae="PACS")
    return instance.series


def analyse(paths, *, task: str, mode: str = "per_series", **changes) -> InferenceJob:
    job = services.job_create(series=store(paths, **changes), task=task, mode=mode)
    job_run(job_id=job.pk)
    return job


def sheet_rows(workbook, name: str) -> list[tuple[Any, ...]]:
    return list(workbook[name].iter_rows(values_only=True))


def excel(rows: list[ReportRow]):
    stream = BytesIO()
    reports.write_excel(rows, stream, model_info=reports.model_info(rows))
    return load_workbook(BytesIO(stream.getvalue()))


@pytest.fixture(autouse=True)
def no_heatmaps(settings):
    """Grad-CAM only where a test asks for it: a CT heatmap costs several forward passes."""
    settings.INFERENCE_GRADCAM = "on_demand"


@pytest.fixture
def models(register_model):
    return {task: register_model(task) for task in ("cxr2d", "ct3d")}


@pytest.fixture
def ct_and_cr(models) -> list[Prediction]:
    analyse(CT_FILES, task="ct3d")
    analyse([CR_JPEG], task="cxr2d")
    return list(reports.report_predictions())


def test_the_excel_has_exactly_the_columns_and_one_row_per_series(ct_and_cr, storage_dir):
    rows = reports.rows_from_predictions(reports.report_predictions())

    workbook = excel(rows)

    header, *body = sheet_rows(workbook, "results")
    assert list(header) == COLUMNS
    assert len(body) == 2
    ct_header = dcmread(CT_FILES[0], stop_before_pixels=True)
    by_study = {row[1]: dict(zip(COLUMNS, row, strict=True)) for row in body}
    ct = by_study[ct_header.StudyInstanceUID]
    assert ct["path_to_study"] == str(storage_dir / ct_header.StudyInstanceUID)
    assert ct["series_uid"] == ct_header.SeriesInstanceUID
    for prediction in ct_and_cr:
        row = by_study[prediction.series.study.study_instance_uid]
        assert row["probability_of_pathology"] == pytest.approx(prediction.probability)
        assert row["pathology"] == int(prediction.label in ("PNEUMONIA", "pathology"))
        assert row["processing_status"] == "Success"
        assert row["time_of_processing"] == pytest.approx(sum(prediction.timings.values()))
    assert "per-slice" not in workbook.sheetnames


def test_the_model_sheet_names_each_model_and_says_not_for_diagnostic_use(ct_and_cr, models):
    workbook = excel(reports.rows_from_predictions(reports.report_predictions()))

    cells = [cell for row in sheet_rows(workbook, "model") for cell in row if cell]
    assert NOT_FOR_DIAGNOSTIC_USE in cells
    for model in models.values():
        assert model.name in cells
        assert model.onnx_sha256 in cells


def test_per_slice_mode_adds_a_per_slice_sheet(models):
    analyse(CT_FILES, task="ct3d", mode="per_slice")

    workbook = excel(reports.rows_from_predictions(reports.report_predictions()))

    assert len(sheet_rows(workbook, "results")) == 1 + 1
    header, *slices = sheet_rows(workbook, "per-slice")
    assert list(header) == [*COLUMNS, "slice_index"]
    assert [row[-1] for row in slices] == list(range(30))
    assert all(row[5] == "Success" and 0 <= row[3] <= 1 for row in slices)


def test_a_series_that_was_not_analysed_is_a_failure_with_its_reason(models):
    analyse(CT_FILES[:8], task="ct3d")

    (row,) = reports.rows_from_predictions(reports.report_predictions())

    assert row.processing_status == "Failure"
    assert (row.probability_of_pathology, row.pathology) == (None, None)
    assert "slices" in row.reason


def test_rows_are_read_in_one_query(models, django_assert_num_queries):
    analyse(CT_FILES, task="ct3d", mode="per_slice")

    with django_assert_num_queries(1):
        rows = reports.rows_from_predictions(reports.report_predictions())

    assert len(rows) == 31


def test_text_that_looks_like_a_formula_stays_text():
    row = ReportRow(
        path_to_study='=HYPERLINK("http://example.com","x")',
        study_uid="1.2",
        series_uid="1.2.3",
        probability_of_pathology=None,
        pathology=None,
        processing_status="Failure",
        time_of_processing=None,
    )

    workbook = excel([row])

    cell = workbook["results"]["A2"]
    assert cell.data_type == "s"
    assert cell.value == row.path_to_study


def test_json_single_keeps_the_four_keys_and_names_the_model(settings, register_model):
    settings.INFERENCE_GRADCAM = "always"
    model = register_model("cxr2d")
    analyse([CR_JPEG], task="cxr2d")

    (row,) = reports.rows_from_predictions(reports.report_predictions())
    single = reports.json_single(row)

    assert single["filename"].endswith(".dcm")
    assert single["mode"] == "per_series"
    assert single["prediction"] in ("NORMAL", "PNEUMONIA")
    assert single["confidence"] == pytest.approx(row.probabilities[single["prediction"]])
    assert single["model"] == {"name": model.name, "version": "1", "sha256": model.onnx_sha256}
    assert single["heatmap_path"].endswith(".png")
    assert single["notice"] == NOT_FOR_DIAGNOSTIC_USE
    json.dumps(single)


def test_json_batch_counts_series_positives_and_failures(models):
    analyse([CR_JPEG], task="cxr2d")
    analyse(CT_FILES, task="ct3d", mode="per_slice")
    head = {"SeriesInstanceUID": generate_uid(), "SOPInstanceUID": generate_uid()}
    analyse([CR_JPEG], task="cxr2d", BodyPartExamined="HEAD", **head)
    rows = reports.rows_from_predictions(reports.report_predictions())

    batch = reports.json_batch(rows)

    series_rows = [row for row in rows if row.slice_index is None]
    assert batch["count"] == len(series_rows) == 3
    assert batch["failures"] == 1
    assert batch["succeeded"] == 2
    assert batch["positives"] == sum(row.pathology == 1 for row in series_rows)
    assert len(batch["items"]) == 3 + 30
    assert {model["name"] for model in batch["models"]} == {"tiny-cxr2d", "tiny-ct3d"}
    assert batch["notice"] == NOT_FOR_DIAGNOSTIC_USE


def test_the_report_command_writes_an_excel_file_of_current_results(ct_and_cr, tmp_path):
    analyse([CR_JPEG], task="cxr2d")  # supersedes the first radiograph result
    out = tmp_path / "report.xlsx"
    stdout = StringIO()

    call_command("report", "--out", str(out), stdout=stdout)

    header, *body = sheet_rows(load_workbook(out), "results")
    assert list(header) == COLUMNS
    assert len(body) == 2
    assert "2 results (2 succeeded, 0 failed)" in stdout.getvalue()


def test_the_report_command_filters_and_writes_json_to_stdout(ct_and_cr):
    stdout = StringIO()

    call_command(
        "report", "--modality", "ct", "--status", "analysed", stdout=stdout, stderr=StringIO()
    )

    batch = json.loads(stdout.getvalue())
    assert batch["count"] == 1
    assert batch["items"][0]["model"]["name"] == "tiny-ct3d"


def test_an_excel_report_needs_a_file_to_go_to():
    with pytest.raises(CommandError, match="--out"):
        call_command("report", "--format", "xlsx", stdout=StringIO())

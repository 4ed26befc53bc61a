"""AI results as reports: an Excel workbook or JSON, from prediction rows or offline inference.

Reports read rows and never recompute: a :class:`ReportRow` is one prediction (a series, an
image, or a CT slice) as a report shows it, made from the database by
:func:`rows_from_predictions` or by offline inference (``inference.offline``). Every report
names the model version and weights sha256 behind each result and carries the notice
:data:`~inference.models.NOT_FOR_DIAGNOSTIC_USE`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO

from django.db.models import QuerySet
from openpyxl import Workbook

from inference.models import NOT_FOR_DIAGNOSTIC_USE, Prediction
from studies.storage import storage_root

SUCCESS = "Success"
FAILURE = "Failure"
# The first sheet's columns, in this order: hospital tooling reads them by position.
COLUMNS = (
    "path_to_study",
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "processing_status",
    "time_of_processing",
)
SLICE_COLUMNS = (*COLUMNS, "slice_index")
FORMATS = ("xlsx", "json")


@dataclass
class ReportRow:
    """One result as reports show it; ``slice_index`` is set on the per-slice rows of a CT.

    ``pathology`` is 1 when the positive label was predicted (its probability reached the
    threshold), 0 otherwise, and None with ``probability_of_pathology`` when the images were
    not analysed (``processing_status`` Failure, ``reason`` says why).
    ``time_of_processing`` is in seconds. ``probabilities`` holds every label's probability.
    """

    path_to_study: str
    study_uid: str
    series_uid: str
    probability_of_pathology: float | None
    pathology: int | None
    processing_status: str
    time_of_processing: float | None
    slice_index: int | None = None
    label: str = ""
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    heatmap_path: str = ""
    boxes: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    filename: str = ""
    mode: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)


def pathology(probability: float | None, threshold: float | None) -> int | None:
    """1 if ``probability`` of the positive label reaches ``threshold``, else 0; None if either
    is unknown. The pipeline labels a result positive by this same rule."""
    if probability is None or threshold is None:
        return None
    return int(probability >= threshold)


def report_predictions(
    *,
    since: dt.date | None = None,
    until: dt.date | None = None,
    modality: str | None = None,
    label: str | None = None,
    status: str | None = None,
    include_superseded: bool = False,
) -> QuerySet[Prediction]:
    """The predictions a report covers, ordered by study, series, job and slice.

    ``since`` and ``until`` bound the day the prediction was made (both included); ``label``
    and ``modality`` match whatever their case; ``status`` is a ``Prediction.Status`` (the
    report's Success is "analysed"). Superseded results (a
    newer job analysed the same series again) are left out unless ``include_superseded``.
    """
    predictions = Prediction.objects.all()
    if not include_superseded:
        predictions = predictions.filter(superseded=False)
    if since is not None:
        predictions = predictions.filter(created_at__date__gte=since)
    if until is not None:
        predictions = predictions.filter(created_at__date__lte=until)
    if modality:
        predictions = predictions.filter(series__modality__iexact=modality)
    if label:
        predictions = predictions.filter(label__iexact=label)
    if status:
        predictions = predictions.filter(status=status)
    return predictions.order_by(
        "series__study__study_instance_uid",
        "series__series_instance_uid",
        "job_id",
        "slice_index",
        "pk",
    )


def rows_from_predictions(predictions: QuerySet[Prediction]) -> list[ReportRow]:
    """One row per prediction, in the queryset's order, read in a single query.

    ``path_to_study`` is the study's folder in DICOM storage; ``filename`` the image's file, or
    the series' folder for a result on the whole series; ``time_of_processing`` the job's total.
    """
    root = storage_root()
    rows = []
    for prediction in predictions.select_related("job", "series__study", "instance"):
        study_uid = prediction.series.study.study_instance_uid
        series_uid = prediction.series.series_instance_uid
        instance = prediction.instance
        analysed = prediction.status == Prediction.Status.ANALYSED
        timings = prediction.timings or {}
        rows.append(
            ReportRow(
                path_to_study=str(root / study_uid),
                study_uid=study_uid,
                series_uid=series_uid,
                probability_of_pathology=prediction.probability,
                pathology=pathology(prediction.probability, prediction.threshold),
                processing_status=SUCCESS if analysed else FAILURE,
                time_of_processing=round(sum(timings.values()), 4) if timings else None,
                slice_index=prediction.slice_index,
                label=prediction.label,
                model_name=prediction.model_name,
                model_version=prediction.model_version,
                model_sha256=prediction.model_sha256,
                heatmap_path=prediction.heatmap_path,
                boxes=prediction.boxes,
                reason=prediction.reason,
                filename=str(
                    root / instance.file_path if instance else root / study_uid / series_uid
                ),
                mode=prediction.job.mode,
                probabilities=prediction.probabilities,
            )
        )
    return rows


def model_info(rows: list[ReportRow]) -> list[dict[str, str]]:
    """The distinct models behind ``rows`` (name, version, sha256), in order of appearance."""
    seen: dict[tuple[str, str, str], None] = {}
    for row in rows:
        if row.model_name:
            seen.setdefault((row.model_name, row.model_version, row.model_sha256))
    return [{"name": n, "version": v, "sha256": sha} for n, v, sha in seen]


def write_excel(
    rows: list[ReportRow], stream: BinaryIO, *, model_info: list[dict[str, str]]
) -> None:
    """Write an .xlsx workbook to ``stream``.

    Sheet "results": a header of exactly :data:`COLUMNS` and one row per series (or image);
    sheet "per-slice", only when there are per-slice rows: :data:`SLICE_COLUMNS`, one row per
    slice; sheet "model": the notice, then each model's name, version and sha256. Text is
    written as text, never as a formula, whatever it starts with.
    """
    workbook = Workbook()
    results = workbook.active
    results.title = "results"
    _append(results, COLUMNS)
    for row in rows:
        if row.slice_index is None:
            _append(results, [getattr(row, column) for column in COLUMNS])
    slices = [row for row in rows if row.slice_index is not None]
    if slices:
        sheet = workbook.create_sheet("per-slice")
        _append(sheet, SLICE_COLUMNS)
        for row in slices:
            _append(sheet, [getattr(row, column) for column in SLICE_COLUMNS])
    models = workbook.create_sheet("model")
    _append(models, ["notice", NOT_FOR_DIAGNOSTIC_USE])
    _append(models, [])
    _append(models, ["name", "version", "sha256"])
    for model in model_info:
        _append(models, [model["name"], model["version"], model["sha256"]])
    workbook.properties.description = NOT_FOR_DIAGNOSTIC_USE
    workbook.save(stream)


def _append(sheet: Any, values: list[Any] | tuple[Any, ...]) -> None:
    """Append a row; a string such as a file name starting with "=" stays text (no formula)."""
    sheet.append(values)
    for cell in sheet[sheet.max_row]:
        if isinstance(cell.value, str):
            cell.data_type = "s"


def json_single(row: ReportRow) -> dict[str, Any]:
    """One result as JSON: ``filename``, ``mode``, ``prediction`` (the label, None when not
    analysed) and ``confidence`` (that label's probability), then the report columns, the
    reason, the model, the heatmap's path and boxes, and the notice."""
    return {
        "filename": row.filename,
        "mode": row.mode,
        "prediction": row.label or None,
        "confidence": row.probabilities.get(row.label),
        **{column: getattr(row, column) for column in SLICE_COLUMNS},
        "reason": row.reason,
        "model": {"name": row.model_name, "version": row.model_version, "sha256": row.model_sha256},
        "heatmap_path": row.heatmap_path,
        "boxes": row.boxes,
        "notice": NOT_FOR_DIAGNOSTIC_USE,
    }


def json_batch(rows: list[ReportRow]) -> dict[str, Any]:
    """Many results as JSON: counts over the series (per-slice rows are not counted), the
    models, the notice, and every row as :func:`json_single` gives it under ``items``."""
    series = [row for row in rows if row.slice_index is None]
    return {
        "notice": NOT_FOR_DIAGNOSTIC_USE,
        "models": model_info(rows),
        "count": len(series),
        "succeeded": sum(row.processing_status == SUCCESS for row in series),
        "failures": sum(row.processing_status == FAILURE for row in series),
        "positives": sum(row.pathology == 1 for row in series),
        "items": [json_single(row) for row in rows],
    }


def render(rows: list[ReportRow], *, fmt: str) -> bytes:
    """The report as a file's bytes: an .xlsx workbook (``fmt`` "xlsx") or UTF-8 JSON ("json")."""
    if fmt == "json":
        return (json.dumps(json_batch(rows), indent=2, ensure_ascii=False) + "\n").encode()
    if fmt != "xlsx":
        raise ValueError(f"unknown report format {fmt!r}; one of {', '.join(FORMATS)}")
    buffer = BytesIO()
    write_excel(rows, buffer, model_info=model_info(rows))
    return buffer.getvalue()

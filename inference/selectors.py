"""Reads for the inference app."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db.models import Exists, F, OuterRef, QuerySet

from inference.models import InferenceJob, Mode, ModelVersion, Prediction, Review, RoutingRule
from studies.models import Series, Study


def _listed(value: str, allowed: str) -> bool:
    choices = {item.strip().upper() for item in allowed.split(",") if item.strip()}
    return not choices or value.strip().upper() in choices


def routing_rule_for_series(*, series: Series) -> RoutingRule | None:
    """The first enabled rule, by priority, that the series matches; None if none does.

    A rule's ``min_instances`` is not matched here: the quality gate checks it, so a short
    series gets a visible "not analysed" with its reason instead of silence.
    """
    sop_classes = set(series.instances.values_list("sop_class_uid", flat=True).distinct())
    for rule in RoutingRule.objects.filter(enabled=True):
        if not _listed(series.modality, rule.modalities):
            continue
        if not _listed(series.view_position, rule.view_positions):
            continue
        if rule.sop_class_uids and not sop_classes <= {
            uid.strip() for uid in rule.sop_class_uids.split(",")
        }:
            continue
        if rule.body_part_regex and not re.search(
            rule.body_part_regex, series.body_part_examined.strip(), re.IGNORECASE
        ):
            continue
        if rule.series_description_regex and not re.search(
            rule.series_description_regex, series.series_description, re.IGNORECASE
        ):
            continue
        return rule
    return None


def active_models(*, task: str) -> QuerySet[ModelVersion]:
    """The active model versions of a task: one, or several that form a weighted ensemble."""
    return ModelVersion.objects.filter(task=task, status=ModelVersion.Status.ACTIVE).order_by("pk")


def model_version_list() -> QuerySet[ModelVersion]:
    """Every registered model version, newest first."""
    return ModelVersion.objects.order_by("-created_at", "-pk")


def study_list() -> QuerySet[Study]:
    """Every study, most recent study date first (undated last)."""
    return Study.objects.order_by(F("study_date").desc(nulls_last=True), "-pk")


def series_list() -> QuerySet[Series]:
    """Every series with its study, most recently received first."""
    return Series.objects.select_related("study").order_by("-last_received_at", "-pk")


def job_list() -> QuerySet[InferenceJob]:
    """Every inference job with its rule and requested model, newest first."""
    return InferenceJob.objects.select_related("routing_rule", "requested_model").order_by("-pk")


def prediction_list() -> QuerySet[Prediction]:
    """Every prediction, newest first, with its series and study, and ``reviewed`` annotated
    (whether a radiologist has reviewed it)."""
    return (
        Prediction.objects.select_related("series__study")
        .annotate(reviewed=Exists(Review.objects.filter(prediction=OuterRef("pk"))))
        .order_by("-pk")
    )


def series_current_predictions(*, series: Series) -> QuerySet[Prediction]:
    """The series-level predictions of a series that no newer job has superseded."""
    return prediction_list().filter(series=series, superseded=False, slice_index__isnull=True)


def series_slices(*, series: Series, job_id: int | None = None) -> QuerySet[Prediction]:
    """Per-slice predictions of a series in slice order: of ``job_id`` if given, else of the
    newest job of the series that made any."""
    slices = Prediction.objects.filter(series=series, slice_index__isnull=False)
    if job_id is None:
        job_id = slices.order_by("-job_id").values_list("job_id", flat=True).first()
    return slices.filter(job_id=job_id).order_by("slice_index", "pk")


def prediction_patient_ids(*, predictions: QuerySet[Prediction]) -> list[int]:
    """The ids of the patients (rows, not DICOM Patient IDs) whose results ``predictions`` hold."""
    return sorted(
        predictions.order_by().values_list("series__study__patient_id", flat=True).distinct()
    )


class RerunRefused(ValueError):
    """A re-run that cannot be planned; the message says why, without patient data."""


@dataclass(frozen=True)
class JobPlan:
    task: str
    mode: str
    routing_rule: RoutingRule | None


def series_job_plan(
    *,
    series: Series,
    model: ModelVersion | None = None,
    task: str | None = None,
    mode: str | None = None,
) -> JobPlan:
    """What a re-run of ``series`` runs.

    The task is the model's, which must match ``task`` if given, else the series' own task (its
    routing rule's, else its latest job's). Without a model the task is ``task`` or the series'
    own. The mode is ``mode``, else the rule's or latest job's for that task, else per series.
    The routing rule of that task comes along, so its quality gate applies again.
    Raises RerunRefused for a series still receiving, a model of another task, or no task.
    """
    if series.status != Series.Status.COMPLETE:
        raise RerunRefused("the series is still receiving images")
    rule = routing_rule_for_series(series=series)
    latest = series.jobs.order_by("-pk").first()
    wanted = task or (rule.task if rule else None) or (latest.task if latest else None)
    if model is not None:
        if wanted is not None and model.task != wanted:
            raise RerunRefused(f"model {model.pk} is for task {model.task}, not {wanted}")
        wanted = model.task
    if wanted is None:
        raise RerunRefused("no routing rule matches the series and it has no job: give a model")
    rule = rule if rule is not None and rule.task == wanted else None
    if mode is None:
        if rule is not None:
            mode = rule.mode
        elif latest is not None and latest.task == wanted:
            mode = latest.mode
        else:
            mode = Mode.PER_SERIES
    return JobPlan(task=wanted, mode=mode, routing_rule=rule)


def prediction_heatmap_file(*, prediction: Prediction) -> Path | None:
    """The heatmap PNG of a prediction, inside INFERENCE_OUTPUT_DIR; None if it has none."""
    if not prediction.heatmap_path:
        return None
    root = Path(settings.INFERENCE_OUTPUT_DIR).resolve()
    path = (root / prediction.heatmap_path).resolve()
    if path.suffix != ".png" or not path.is_relative_to(root) or not path.is_file():
        return None
    return path

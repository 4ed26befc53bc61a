"""Query filters of the list endpoints and reports (django-filter).

Dates are ranges: ``<name>_after`` and ``<name>_before`` (ISO dates, both ends included).
On studies, series and jobs, ``label``, ``model_name``, ``model_version`` and ``reviewed`` match
rows with at least one such prediction (for studies and series: one not superseded).
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import Exists, OuterRef, QuerySet
from django_filters import rest_framework as filters

from inference.models import InferenceJob, Mode, ModelVersion, Prediction, Review, Task
from studies.models import Series, Study


class _ByResults(filters.FilterSet):
    """Filters a row by the predictions linked to it through ``link``."""

    link: ClassVar[str]
    current_only: ClassVar[bool] = True

    label = filters.CharFilter(method="filter_label", help_text="A predicted label.")
    model_name = filters.CharFilter(method="filter_model_name", help_text="A model's name.")
    model_version = filters.CharFilter(
        method="filter_model_version", help_text="A model's version."
    )
    reviewed = filters.BooleanFilter(
        method="filter_reviewed", help_text="Whether a radiologist reviewed a prediction."
    )

    def filter_label(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(self._results(label__iexact=value))

    def filter_model_name(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(self._results(model_name=value))

    def filter_model_version(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(self._results(model_version=value))

    def filter_reviewed(self, queryset: QuerySet[Any], name: str, value: bool) -> QuerySet[Any]:
        reviewed = self._results(reviews__isnull=False)
        return queryset.filter(reviewed if value else ~reviewed)

    def _results(self, **conditions: Any) -> Exists:
        results = Prediction.objects.filter(**{self.link: OuterRef("pk")}, **conditions)
        return Exists(results.filter(superseded=False) if self.current_only else results)


class StudyFilter(_ByResults):
    link = "series__study"

    study_date = filters.DateFromToRangeFilter()
    received = filters.DateFromToRangeFilter(field_name="created_at")
    modality = filters.CharFilter(method="filter_modality", help_text="A series' modality.")
    accession_number = filters.CharFilter()

    class Meta:
        model = Study
        fields: ClassVar[list[str]] = []

    def filter_modality(self, queryset: QuerySet[Study], name: str, value: str) -> QuerySet[Study]:
        series = Series.objects.filter(study=OuterRef("pk"), modality__iexact=value)
        return queryset.filter(Exists(series))


class SeriesFilter(_ByResults):
    link = "series"

    study_date = filters.DateFromToRangeFilter(field_name="study__study_date")
    received = filters.DateFromToRangeFilter(field_name="last_received_at")
    modality = filters.CharFilter(lookup_expr="iexact")
    status = filters.ChoiceFilter(choices=Series.Status.choices)
    study = filters.NumberFilter(field_name="study_id")

    class Meta:
        model = Series
        fields: ClassVar[list[str]] = []


class JobFilter(_ByResults):
    link = "job"
    current_only = False

    created = filters.DateFromToRangeFilter(field_name="created_at")
    study_date = filters.DateFromToRangeFilter(field_name="series__study__study_date")
    modality = filters.CharFilter(field_name="series__modality", lookup_expr="iexact")
    status = filters.ChoiceFilter(choices=InferenceJob.Status.choices)
    task = filters.ChoiceFilter(choices=Task.choices)
    mode = filters.ChoiceFilter(choices=Mode.choices)
    series = filters.NumberFilter(field_name="series_id")

    class Meta:
        model = InferenceJob
        fields: ClassVar[list[str]] = []


class PredictionFilter(filters.FilterSet):
    created = filters.DateFromToRangeFilter(field_name="created_at")
    study_date = filters.DateFromToRangeFilter(field_name="series__study__study_date")
    modality = filters.CharFilter(field_name="series__modality", lookup_expr="iexact")
    label = filters.CharFilter(lookup_expr="iexact")
    status = filters.ChoiceFilter(choices=Prediction.Status.choices)
    model_name = filters.CharFilter()
    model_version = filters.CharFilter()
    reviewed = filters.BooleanFilter(
        method="filter_reviewed", help_text="Whether a radiologist reviewed it."
    )
    superseded = filters.BooleanFilter(help_text="Whether a newer job replaced it.")
    per_slice = filters.BooleanFilter(
        field_name="slice_index",
        lookup_expr="isnull",
        exclude=True,
        help_text="true: only per-slice rows; false: only per-series (and per-image) rows.",
    )
    series = filters.NumberFilter(field_name="series_id")
    job = filters.NumberFilter(field_name="job_id")

    class Meta:
        model = Prediction
        fields: ClassVar[list[str]] = []

    def filter_reviewed(
        self, queryset: QuerySet[Prediction], name: str, value: bool
    ) -> QuerySet[Prediction]:
        reviewed = Exists(Review.objects.filter(prediction=OuterRef("pk")))
        return queryset.filter(reviewed if value else ~reviewed)


class ModelVersionFilter(filters.FilterSet):
    name = filters.CharFilter()
    task = filters.ChoiceFilter(choices=Task.choices)
    status = filters.ChoiceFilter(choices=ModelVersion.Status.choices)

    class Meta:
        model = ModelVersion
        fields: ClassVar[list[str]] = []

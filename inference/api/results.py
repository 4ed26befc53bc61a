"""Read views of studies, series and AI results; each view of a patient's results is audited."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from django.db.models import QuerySet
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.generics import GenericAPIView, ListAPIView, RetrieveAPIView
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from inference import reports
from inference.api.filters import PredictionFilter, SeriesFilter, StudyFilter
from inference.api.permissions import CanReadResults
from inference.api.serializers import (
    PREDICTION_EXAMPLE,
    REPORT_EXAMPLE,
    SERIES_EXAMPLE,
    SLICE_EXAMPLE,
    STUDY_EXAMPLE,
    PredictionSerializer,
    SeriesDetailSerializer,
    SeriesSerializer,
    SliceSerializer,
    StudyDetailSerializer,
    StudySerializer,
)
from inference.models import NOT_FOR_DIAGNOSTIC_USE, Prediction
from inference.selectors import (
    prediction_heatmap_file,
    prediction_list,
    prediction_patient_ids,
    series_list,
    series_slices,
    study_list,
)
from inference.services import audit_record
from studies.models import Series, Study

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def _example(name: str, value: dict[str, Any]) -> list[OpenApiExample]:
    return [OpenApiExample(name, value=value, response_only=True)]


@extend_schema(summary="List studies", examples=_example("A study", STUDY_EXAMPLE))
class StudyListApi(ListAPIView[Study]):
    permission_classes = [CanReadResults]
    serializer_class = StudySerializer
    filterset_class = StudyFilter

    def get_queryset(self) -> QuerySet[Study]:
        return study_list()


@extend_schema(
    summary="A study and its series",
    examples=_example("A study", {**STUDY_EXAMPLE, "series": [SERIES_EXAMPLE]}),
)
class StudyDetailApi(RetrieveAPIView[Study]):
    permission_classes = [CanReadResults]
    serializer_class = StudyDetailSerializer

    def get_queryset(self) -> QuerySet[Study]:
        return study_list().prefetch_related("series")


@extend_schema(summary="List series", examples=_example("A series", SERIES_EXAMPLE))
class SeriesListApi(ListAPIView[Series]):
    permission_classes = [CanReadResults]
    serializer_class = SeriesSerializer
    filterset_class = SeriesFilter

    def get_queryset(self) -> QuerySet[Series]:
        return series_list()


@extend_schema(
    summary="A series and its current AI results (audited)",
    examples=_example("A series", {**SERIES_EXAMPLE, "predictions": [PREDICTION_EXAMPLE]}),
)
class SeriesDetailApi(RetrieveAPIView[Series]):
    permission_classes = [CanReadResults]
    serializer_class = SeriesDetailSerializer

    def get_queryset(self) -> QuerySet[Series]:
        return series_list()

    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        series = self.get_object()
        audit_record(
            user=request.user,
            action="view",
            object_type="series",
            object_id=series.pk,
            patient_id=series.study.patient_id,
            path=request.path,
        )
        return Response(self.get_serializer(series).data)


@extend_schema(
    summary="Per-slice probabilities of a series (audited)",
    parameters=[
        OpenApiParameter(
            "job", int, description="The job whose slices to list; default: the newest with any."
        )
    ],
    examples=_example("A slice", SLICE_EXAMPLE),
)
class SeriesSlicesApi(ListAPIView[Prediction]):
    permission_classes = [CanReadResults]
    serializer_class = SliceSerializer
    filter_backends = ()  # the only query parameter is ``job``, read below

    class InputSerializer(serializers.Serializer[Any]):
        job = serializers.IntegerField(required=False, min_value=1)

    def get(self, request: Request, pk: int) -> Response:
        series = get_object_or_404(series_list(), pk=pk)
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        audit_record(
            user=request.user,
            action="view",
            object_type="series",
            object_id=series.pk,
            patient_id=series.study.patient_id,
            path=request.path,
        )
        slices = series_slices(series=series, job_id=params.validated_data.get("job"))
        page = self.paginate_queryset(slices)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


@extend_schema(summary="List AI results", examples=_example("A prediction", PREDICTION_EXAMPLE))
class PredictionListApi(ListAPIView[Prediction]):
    permission_classes = [CanReadResults]
    serializer_class = PredictionSerializer
    filterset_class = PredictionFilter

    def get_queryset(self) -> QuerySet[Prediction]:
        return prediction_list()


@extend_schema(
    summary="One AI result (audited)", examples=_example("A prediction", PREDICTION_EXAMPLE)
)
class PredictionDetailApi(RetrieveAPIView[Prediction]):
    permission_classes = [CanReadResults]
    serializer_class = PredictionSerializer

    def get_queryset(self) -> QuerySet[Prediction]:
        return prediction_list()

    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        prediction = self.get_object()
        audit_record(
            user=request.user,
            action="view",
            object_type="prediction",
            object_id=prediction.pk,
            patient_id=prediction.series.study.patient_id,
            path=request.path,
        )
        return Response(self.get_serializer(prediction).data)


class _FileApi(GenericAPIView[Prediction]):
    """A view that answers with a file: errors stay JSON even when the client asked only for
    the file's type (``Accept: image/png``, ``?format=xlsx``), which no renderer makes."""

    def perform_content_negotiation(
        self, request: Request, force: bool = False
    ) -> tuple[BaseRenderer, str]:
        return super().perform_content_negotiation(request, force=True)


@extend_schema(
    summary="The heatmap PNG of an AI result (audited)",
    description="Headers X-Model-Name, X-Model-Version, X-Model-Sha256 and X-AI-Notice "
    "say which model drew it and that it is not for diagnostic use.",
    responses={
        (200, "image/png"): OpenApiResponse(OpenApiTypes.BINARY, description="The PNG."),
        404: OpenApiResponse(
            inline_serializer("Detail", {"detail": serializers.CharField()}),
            description="No such prediction, or it has no heatmap.",
            examples=[
                OpenApiExample(
                    "No heatmap",
                    value={"detail": "This prediction has no heatmap."},
                    response_only=True,
                    status_codes=[404],
                )
            ],
        ),
    },
)
class PredictionHeatmapApi(_FileApi):
    permission_classes = [CanReadResults]

    def get(self, request: Request, pk: int) -> FileResponse:
        prediction = get_object_or_404(prediction_list(), pk=pk)
        path = prediction_heatmap_file(prediction=prediction)
        if path is None:
            raise Http404("This prediction has no heatmap.")
        audit_record(
            user=request.user,
            action="view",
            object_type="heatmap",
            object_id=prediction.pk,
            patient_id=prediction.series.study.patient_id,
            path=request.path,
        )
        response = FileResponse(path.open("rb"), content_type="image/png")
        response.headers["X-Model-Name"] = prediction.model_name
        response.headers["X-Model-Version"] = prediction.model_version
        response.headers["X-Model-Sha256"] = prediction.model_sha256
        response.headers["X-AI-Notice"] = NOT_FOR_DIAGNOSTIC_USE
        return response


@extend_schema(
    summary="A report of the filtered AI results, as Excel or JSON (audited per patient)",
    description="Takes the filters of /api/predictions/; superseded results are left out "
    "unless superseded is given.",
    filters=True,
    parameters=[
        OpenApiParameter("format", str, enum=["json", "xlsx"], description="Default: json.")
    ],
    responses={
        (200, "application/json"): OpenApiResponse(
            OpenApiTypes.OBJECT,
            description="A batch: counts, models, notice and one item per prediction.",
            examples=[OpenApiExample("A batch", value=REPORT_EXAMPLE, response_only=True)],
        ),
        (200, XLSX): OpenApiResponse(OpenApiTypes.BINARY, description="A workbook."),
    },
)
class ReportApi(_FileApi):
    permission_classes = [CanReadResults]
    filterset_class = PredictionFilter  # documents the filters in the schema

    class InputSerializer(serializers.Serializer[Any]):
        format = serializers.ChoiceField(choices=["json", "xlsx"], default="json")

    def get_queryset(self) -> QuerySet[Prediction]:
        return reports.report_predictions(include_superseded=True)

    def get(self, request: Request) -> HttpResponse:
        params = self.InputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        query = request.query_params.copy()
        query.setdefault("superseded", "false")
        filterset = PredictionFilter(query, queryset=self.get_queryset())
        if not filterset.is_valid():
            raise ValidationError(filterset.errors)
        predictions = filterset.qs
        rows = reports.rows_from_predictions(predictions)
        kind = params.validated_data["format"]
        for patient_id in prediction_patient_ids(predictions=predictions):
            audit_record(
                user=request.user,
                action="export",
                object_type="report",
                object_id=kind,
                patient_id=patient_id,
                path=request.get_full_path(),
            )
        if kind == "json":
            return Response(reports.json_batch(rows))
        stream = BytesIO()
        reports.write_excel(rows, stream, model_info=reports.model_info(rows))
        return HttpResponse(
            stream.getvalue(),
            content_type=XLSX,
            headers={"Content-Disposition": 'attachment; filename="pacs-ai-report.xlsx"'},
        )

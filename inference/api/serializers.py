"""Output serializers shared by several views, and the examples the OpenAPI schema shows.

Every serializer of an AI output ends in the model's name, version and sha256 and ``notice``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from inference.models import NOT_FOR_DIAGNOSTIC_USE, InferenceJob, ModelVersion, Prediction
from inference.selectors import series_current_predictions
from studies.models import Series, Study

AI_FIELDS = ["model_name", "model_version", "model_sha256", "notice"]
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class AIResultSerializer(serializers.ModelSerializer[Prediction]):
    """The fields every AI output carries: which model made it, and that it is not diagnostic."""

    notice = serializers.SerializerMethodField(help_text="Always: " + NOT_FOR_DIAGNOSTIC_USE)

    class Meta:
        model = Prediction
        fields: ClassVar[list[str]] = AI_FIELDS

    @extend_schema_field(OpenApiTypes.STR)
    def get_notice(self, prediction: Prediction) -> str:
        return NOT_FOR_DIAGNOSTIC_USE


class PredictionSerializer(AIResultSerializer):
    reviewed = serializers.BooleanField(read_only=True, help_text="A radiologist reviewed it.")
    heatmap = serializers.SerializerMethodField(help_text="URL of the heatmap PNG, if any.")

    class Meta(AIResultSerializer.Meta):
        fields: ClassVar[list[str]] = [
            "id",
            "series",
            "job",
            "instance",
            "slice_index",
            "status",
            "reason",
            "label",
            "probability",
            "probabilities",
            "threshold",
            "boxes",
            "superseded",
            "reviewed",
            "heatmap",
            "created_at",
            *AI_FIELDS,
        ]

    @extend_schema_field(OpenApiTypes.URI)
    def get_heatmap(self, prediction: Prediction) -> str | None:
        if not prediction.heatmap_path:
            return None
        request = self.context.get("request")
        return reverse("api:prediction-heatmap", args=[prediction.pk], request=request)


class SliceSerializer(AIResultSerializer):
    class Meta(AIResultSerializer.Meta):
        fields: ClassVar[list[str]] = [
            "slice_index",
            "instance",
            "probability",
            "label",
            "job",
            *AI_FIELDS,
        ]


class StudySerializer(serializers.ModelSerializer[Study]):
    class Meta:
        model = Study
        fields: ClassVar[list[str]] = [
            "id",
            "study_instance_uid",
            "study_date",
            "accession_number",
            "description",
            "created_at",
        ]


class SeriesSerializer(serializers.ModelSerializer[Series]):
    study_instance_uid = serializers.CharField(source="study.study_instance_uid", read_only=True)

    class Meta:
        model = Series
        fields: ClassVar[list[str]] = [
            "id",
            "series_instance_uid",
            "study",
            "study_instance_uid",
            "modality",
            "body_part_examined",
            "series_description",
            "series_number",
            "view_position",
            "status",
            "revision",
            "first_received_at",
            "last_received_at",
            "completed_at",
        ]


class SeriesDetailSerializer(SeriesSerializer):
    predictions = serializers.SerializerMethodField(
        help_text="The current (not superseded) per-series results."
    )

    class Meta(SeriesSerializer.Meta):
        fields: ClassVar[list[str]] = [*SeriesSerializer.Meta.fields, "predictions"]

    @extend_schema_field(PredictionSerializer(many=True))
    def get_predictions(self, series: Series) -> list[Any]:
        predictions = series_current_predictions(series=series)
        rows = serializers.ListSerializer(
            predictions, child=PredictionSerializer(), context=self.context
        )
        return rows.data


class StudyDetailSerializer(StudySerializer):
    series = SeriesSerializer(many=True, read_only=True)

    class Meta(StudySerializer.Meta):
        fields: ClassVar[list[str]] = [*StudySerializer.Meta.fields, "series"]


class JobSerializer(serializers.ModelSerializer[InferenceJob]):
    routing_rule = serializers.CharField(source="routing_rule.name", read_only=True, default=None)

    class Meta:
        model = InferenceJob
        fields: ClassVar[list[str]] = [
            "id",
            "series",
            "series_revision",
            "task",
            "mode",
            "status",
            "attempts",
            "error",
            "routing_rule",
            "requested_model",
            "created_at",
            "queued_at",
            "started_at",
            "finished_at",
        ]


class ModelVersionSerializer(serializers.ModelSerializer[ModelVersion]):
    class Meta:
        model = ModelVersion
        fields: ClassVar[list[str]] = [
            "id",
            "name",
            "version",
            "task",
            "architecture",
            "class_labels",
            "positive_label",
            "threshold",
            "status",
            "ensemble_weight",
            "onnx_sha256",
            "weights_sha256",
            "metrics",
            "model_card",
            "created_at",
            "activated_at",
        ]


_AI = {
    "model_name": "cxr-resnet18",
    "model_version": "2026.1",
    "model_sha256": SHA256,
    "notice": NOT_FOR_DIAGNOSTIC_USE,
}
PREDICTION_EXAMPLE = {
    "id": 812,
    "series": 301,
    "job": 455,
    "instance": 9120,
    "slice_index": None,
    "status": "analysed",
    "reason": "",
    "label": "PNEUMONIA",
    "probability": 0.91,
    "probabilities": {"NORMAL": 0.09, "PNEUMONIA": 0.91},
    "threshold": 0.5,
    "boxes": [{"x": 312, "y": 268, "width": 240, "height": 310}],
    "superseded": False,
    "reviewed": False,
    "heatmap": "https://pacs-ai.example.org/api/predictions/812/heatmap/",
    "created_at": "2026-01-05T09:14:03Z",
    **_AI,
}
SLICE_EXAMPLE = {
    "slice_index": 42,
    "instance": 10342,
    "probability": 0.73,
    "label": "pathology",
    "job": 456,
    **_AI,
    "model_name": "ct-r3d18",
}
REPORT_EXAMPLE = {
    "notice": NOT_FOR_DIAGNOSTIC_USE,
    "models": [{"name": "cxr-resnet18", "version": "2026.1", "sha256": SHA256}],
    "count": 1,
    "succeeded": 1,
    "failures": 0,
    "positives": 1,
    "items": [
        {
            "filename": "/var/lib/pacs-ai/dicom/1.2.826.0.1.3680043.8.498.1001/"
            "1.2.826.0.1.3680043.8.498.1002/1.2.826.0.1.3680043.8.498.1003.dcm",
            "mode": "per_series",
            "prediction": "PNEUMONIA",
            "confidence": 0.91,
            "path_to_study": "/var/lib/pacs-ai/dicom/1.2.826.0.1.3680043.8.498.1001",
            "study_uid": "1.2.826.0.1.3680043.8.498.1001",
            "series_uid": "1.2.826.0.1.3680043.8.498.1002",
            "probability_of_pathology": 0.91,
            "pathology": 1,
            "processing_status": "Success",
            "time_of_processing": 0.84,
            "slice_index": None,
            "reason": "",
            "model": {"name": "cxr-resnet18", "version": "2026.1", "sha256": SHA256},
            "heatmap_path": "jobs/455/heatmap-9120.png",
            "boxes": [{"x": 312, "y": 268, "width": 240, "height": 310}],
            "notice": NOT_FOR_DIAGNOSTIC_USE,
        }
    ],
}
STUDY_EXAMPLE = {
    "id": 120,
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1001",
    "study_date": "2026-01-05",
    "accession_number": "ACC0001234",
    "description": "CHEST PA",
    "created_at": "2026-01-05T09:13:40Z",
}
SERIES_EXAMPLE = {
    "id": 301,
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.1002",
    "study": 120,
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1001",
    "modality": "CR",
    "body_part_examined": "CHEST",
    "series_description": "PA",
    "series_number": 1,
    "view_position": "PA",
    "status": "complete",
    "revision": 1,
    "first_received_at": "2026-01-05T09:13:40Z",
    "last_received_at": "2026-01-05T09:13:41Z",
    "completed_at": "2026-01-05T09:13:47Z",
}
JOB_EXAMPLE = {
    "id": 455,
    "series": 301,
    "series_revision": 1,
    "task": "cxr2d",
    "mode": "per_series",
    "status": "succeeded",
    "attempts": 1,
    "error": "",
    "routing_rule": "chest radiographs",
    "requested_model": None,
    "created_at": "2026-01-05T09:13:47Z",
    "queued_at": "2026-01-05T09:13:47Z",
    "started_at": "2026-01-05T09:13:48Z",
    "finished_at": "2026-01-05T09:13:49Z",
}
MODEL_VERSION_EXAMPLE = {
    "id": 7,
    "name": "cxr-resnet18",
    "version": "2026.1",
    "task": "cxr2d",
    "architecture": "resnet18",
    "class_labels": ["NORMAL", "PNEUMONIA"],
    "positive_label": "PNEUMONIA",
    "threshold": 0.5,
    "status": "active",
    "ensemble_weight": 1.0,
    "onnx_sha256": SHA256,
    "weights_sha256": SHA256,
    "metrics": {"auroc": 0.94},
    "model_card": {"intended_use": "Research and evaluation. Not for diagnostic use."},
    "created_at": "2026-01-02T10:00:00Z",
    "activated_at": "2026-01-03T08:00:00Z",
}

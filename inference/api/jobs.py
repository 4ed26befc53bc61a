"""Inference jobs: read them, re-run a series, re-queue a failed job."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference.api.filters import JobFilter
from inference.api.permissions import CanReadResults, CanRunJobs
from inference.api.serializers import JOB_EXAMPLE, JobSerializer
from inference.models import InferenceJob, Mode, ModelVersion, Task
from inference.selectors import RerunRefused, job_list, series_job_plan, series_list
from inference.services import job_create, job_requeue

QUEUED_EXAMPLE = {
    **JOB_EXAMPLE,
    "status": "queued",
    "attempts": 0,
    "started_at": None,
    "finished_at": None,
}


@extend_schema(
    summary="List inference jobs",
    examples=[OpenApiExample("A job", value=JOB_EXAMPLE, response_only=True)],
)
class JobListApi(ListAPIView[InferenceJob]):
    permission_classes = [CanReadResults]
    serializer_class = JobSerializer
    filterset_class = JobFilter

    def get_queryset(self) -> QuerySet[InferenceJob]:
        return job_list()


@extend_schema(
    summary="One inference job",
    examples=[OpenApiExample("A job", value=JOB_EXAMPLE, response_only=True)],
)
class JobDetailApi(RetrieveAPIView[InferenceJob]):
    permission_classes = [CanReadResults]
    serializer_class = JobSerializer

    def get_queryset(self) -> QuerySet[InferenceJob]:
        return job_list()


class JobRequeueApi(APIView):
    permission_classes = [CanRunJobs]

    @extend_schema(
        summary="Queue a failed job again",
        request=None,
        responses={
            202: JobSerializer,
            409: OpenApiResponse(description="The job has not failed."),
        },
        examples=[
            OpenApiExample(
                "Queued again", value=QUEUED_EXAMPLE, response_only=True, status_codes=[202]
            )
        ],
    )
    def post(self, request: Request, pk: int) -> Response:
        job = get_object_or_404(job_list(), pk=pk)
        if not job_requeue(job=job):
            return Response(
                {"detail": f"Only a failed job can be queued again; this one is {job.status}."},
                status=status.HTTP_409_CONFLICT,
            )
        job.refresh_from_db()
        return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class SeriesRerunApi(APIView):
    permission_classes = [CanRunJobs]

    class InputSerializer(serializers.Serializer[Any]):
        model = serializers.PrimaryKeyRelatedField(
            queryset=ModelVersion.objects.all(),
            required=False,
            help_text="A model version to run; default: the active model(s) of the task.",
        )
        task = serializers.ChoiceField(
            choices=Task.choices,
            required=False,
            help_text="Default: the model's task, else the series' (routing rule or last job).",
        )
        mode = serializers.ChoiceField(
            choices=Mode.choices,
            required=False,
            help_text="Default: the routing rule's or last job's mode, else per_series.",
        )

        class Meta:
            ref_name = "RerunRequest"

    @extend_schema(
        summary="Run inference on a series again",
        request=InputSerializer,
        responses={202: JobSerializer, 400: OpenApiResponse(description="Cannot be re-run.")},
        examples=[
            OpenApiExample(
                "A given model, slice by slice",
                value={"model": 7, "mode": "per_slice"},
                request_only=True,
            ),
            OpenApiExample("The series' own task", value={}, request_only=True),
            OpenApiExample("Queued", value=QUEUED_EXAMPLE, response_only=True, status_codes=[202]),
        ],
    )
    def post(self, request: Request, pk: int) -> Response:
        series = get_object_or_404(series_list(), pk=pk)
        params = self.InputSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        model = params.validated_data.get("model")
        try:
            plan = series_job_plan(
                series=series,
                model=model,
                task=params.validated_data.get("task"),
                mode=params.validated_data.get("mode"),
            )
        except RerunRefused as exc:
            raise ValidationError({"detail": str(exc)}) from None
        job = job_create(
            series=series,
            task=plan.task,
            mode=plan.mode,
            routing_rule=plan.routing_rule,
            requested_model=model,
        )
        return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

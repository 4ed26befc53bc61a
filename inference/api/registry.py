"""The model registry: read by any authenticated user, activated by administrators."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView, RetrieveAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference.api.filters import ModelVersionFilter
from inference.api.permissions import IsAdministrator
from inference.api.serializers import MODEL_VERSION_EXAMPLE, ModelVersionSerializer
from inference.models import ModelVersion
from inference.selectors import model_version_list
from inference.services import model_version_activate

_EXAMPLES = [OpenApiExample("A model version", value=MODEL_VERSION_EXAMPLE, response_only=True)]


@extend_schema(summary="List model versions", examples=_EXAMPLES)
class ModelVersionListApi(ListAPIView[ModelVersion]):
    permission_classes = [IsAuthenticated]
    serializer_class = ModelVersionSerializer
    filterset_class = ModelVersionFilter

    def get_queryset(self) -> QuerySet[ModelVersion]:
        return model_version_list()


@extend_schema(summary="One model version", examples=_EXAMPLES)
class ModelVersionDetailApi(RetrieveAPIView[ModelVersion]):
    permission_classes = [IsAuthenticated]
    serializer_class = ModelVersionSerializer

    def get_queryset(self) -> QuerySet[ModelVersion]:
        return model_version_list()


class ModelVersionActivateApi(APIView):
    permission_classes = [IsAdministrator]

    class InputSerializer(serializers.Serializer[Any]):
        ensemble = serializers.BooleanField(
            default=False,
            help_text="Keep the task's other active versions (a weighted ensemble) "
            "instead of retiring them.",
        )

        class Meta:
            ref_name = "ActivateRequest"

    @extend_schema(
        summary="Make a model version active for its task (administrators)",
        request=InputSerializer,
        responses=ModelVersionSerializer,
        examples=[
            OpenApiExample("Replace the active version", value={}, request_only=True),
            OpenApiExample("Join an ensemble", value={"ensemble": True}, request_only=True),
            *_EXAMPLES,
        ],
    )
    def post(self, request: Request, pk: int) -> Response:
        model_version = get_object_or_404(model_version_list(), pk=pk)
        params = self.InputSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        model_version = model_version_activate(
            model_version=model_version, ensemble=params.validated_data["ensemble"]
        )
        return Response(ModelVersionSerializer(model_version).data)

"""URLs: the admin, the REST API under ``/api/`` (with its schema and docs), and ``/metrics``."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import IsAuthenticated

from pacs_ai import health, metrics

admin.site.site_header = "pacs-ai (AI results are not for diagnostic use)"
admin.site.site_title = "pacs-ai"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/health/", health.HealthApi.as_view(), name="health"),
    path("api/ready/", health.ReadyApi.as_view(), name="ready"),
    path(
        "api/schema/",
        SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]),
        name="schema",
    ),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="schema", permission_classes=[IsAuthenticated]),
        name="docs",
    ),
    path("api/", include("inference.api.urls")),
    path("metrics", metrics.metrics_view, name="metrics"),
]

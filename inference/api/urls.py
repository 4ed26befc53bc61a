"""Routes of the results API, mounted under ``/api/`` with the namespace ``api``."""

from __future__ import annotations

from django.urls import path

from inference.api import jobs, registry, results

app_name = "api"

urlpatterns = [
    path("studies/", results.StudyListApi.as_view(), name="study-list"),
    path("studies/<int:pk>/", results.StudyDetailApi.as_view(), name="study-detail"),
    path("series/", results.SeriesListApi.as_view(), name="series-list"),
    path("series/<int:pk>/", results.SeriesDetailApi.as_view(), name="series-detail"),
    path("series/<int:pk>/slices/", results.SeriesSlicesApi.as_view(), name="series-slices"),
    path("series/<int:pk>/rerun/", jobs.SeriesRerunApi.as_view(), name="series-rerun"),
    path("jobs/", jobs.JobListApi.as_view(), name="job-list"),
    path("jobs/<int:pk>/", jobs.JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<int:pk>/requeue/", jobs.JobRequeueApi.as_view(), name="job-requeue"),
    path("predictions/", results.PredictionListApi.as_view(), name="prediction-list"),
    path("predictions/<int:pk>/", results.PredictionDetailApi.as_view(), name="prediction-detail"),
    path(
        "predictions/<int:pk>/heatmap/",
        results.PredictionHeatmapApi.as_view(),
        name="prediction-heatmap",
    ),
    path("models/", registry.ModelVersionListApi.as_view(), name="model-list"),
    path("models/<int:pk>/", registry.ModelVersionDetailApi.as_view(), name="model-detail"),
    path(
        "models/<int:pk>/activate/",
        registry.ModelVersionActivateApi.as_view(),
        name="model-activate",
    ),
    path("reports/", results.ReportApi.as_view(), name="report"),
]

"""Training runs in the admin: read-only, as ``manage.py train`` recorded them."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from training.models import TrainingRun

SUMMARY = ("accuracy", "recall", "precision", "roc_auc")


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin[TrainingRun]):
    list_display = [
        "name",
        "version",
        "task",
        "architecture",
        "status",
        "epochs_done",
        "best_epoch",
        "test_summary",
        "model_version",
        "started_at",
        "finished_at",
    ]
    list_filter = ["task", "status"]
    search_fields = ["name", "version"]
    fields = [
        ("name", "version", "status"),
        ("task", "architecture"),
        ("epochs_done", "best_epoch"),
        "model_version",
        "run_dir",
        "dataset",
        "metrics",
        "config",
        "error",
        ("started_at", "finished_at"),
    ]

    @admin.display(description="test (at the chosen threshold)")
    def test_summary(self, run: TrainingRun) -> str:
        test: dict[str, Any] = run.metrics.get("test", {})
        return (
            ", ".join(f"{key} {test[key]:.3f}" for key in SUMMARY if test.get(key) is not None)
            or "-"
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs are started with `manage.py train`

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the record of what a run did

"""A training run, as ``manage.py train`` records it: its progress, metrics and outcome."""

from __future__ import annotations

from django.db import models

from inference.models import ModelVersion, Task


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    name = models.CharField(max_length=64)
    version = models.CharField(max_length=32)
    task = models.CharField(max_length=8, choices=Task.choices)
    architecture = models.CharField(max_length=16, choices=ModelVersion.Architecture.choices)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True
    )
    run_dir = models.CharField(max_length=512, help_text="The run folder: metrics, plots, files.")
    dataset = models.JSONField(default=dict, help_text="Source, classes and split sizes.")
    config = models.JSONField(default=dict, help_text="The command's options.")
    epochs_done = models.PositiveIntegerField(default=0)
    best_epoch = models.PositiveIntegerField(null=True, blank=True)
    metrics = models.JSONField(
        default=dict, blank=True, help_text="The last epoch's, then validation and test."
    )
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.status})"

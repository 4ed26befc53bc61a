"""The model registry, routing, jobs and predictions.

Every prediction carries the model's name, version and weights sha256, copied onto the row so
that it stays true after the registry changes.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from studies.models import DicomNode, Instance, Patient, Series

NOT_FOR_DIAGNOSTIC_USE = "AI result, not for diagnostic use"


class Task(models.TextChoices):
    CXR2D = "cxr2d", "chest X-ray (2D)"
    CT3D = "ct3d", "chest CT (3D)"


class Mode(models.TextChoices):
    PER_SERIES = "per_series", "per series"
    PER_SLICE = "per_slice", "per slice / per instance"


class ModelVersion(models.Model):
    class Architecture(models.TextChoices):
        RESNET10 = "resnet10", "ResNet-10 (2D, 1-channel stem)"
        RESNET18 = "resnet18", "ResNet-18 (2D, 1-channel stem)"
        RESNET50 = "resnet50", "ResNet-50 (2D, 1-channel stem)"
        R3D_18 = "r3d_18", "R3D-18 (3D, 1-channel stem)"

    class Status(models.TextChoices):
        CANDIDATE = "candidate", "candidate"
        ACTIVE = "active", "active"
        RETIRED = "retired", "retired"

    name = models.CharField(max_length=64)
    version = models.CharField(max_length=32)
    task = models.CharField(max_length=8, choices=Task.choices)
    architecture = models.CharField(max_length=16, choices=Architecture.choices)
    class_labels = models.JSONField(help_text="Output order of the network, e.g. NORMAL, PNEUMONIA")
    positive_label = models.CharField(max_length=64)
    threshold = models.FloatField(validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    preprocessing = models.JSONField(help_text="Input size, window and normalisation")
    # Paths relative to INFERENCE_MODELS_DIR; each file's sha256 is checked when it is loaded.
    onnx_path = models.CharField(max_length=255)
    onnx_sha256 = models.CharField(max_length=64)
    weights_path = models.CharField(max_length=255)
    weights_sha256 = models.CharField(max_length=64)
    metrics = models.JSONField(default=dict, blank=True)
    model_card = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.CANDIDATE, db_index=True
    )
    # Used only when several versions of one task are active at once (an ensemble).
    ensemble_weight = models.FloatField(default=1.0, validators=[MinValueValidator(0.001)])
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="unique_model_version"),
            models.CheckConstraint(
                condition=models.Q(ensemble_weight__gt=0), name="ensemble_weight_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.status})"


class RoutingRule(models.Model):
    """Which task and mode a complete series goes to; the first enabled match by priority wins."""

    name = models.CharField(max_length=64, unique=True)
    priority = models.PositiveIntegerField(default=100, help_text="Lower runs first.")
    enabled = models.BooleanField(default=True)
    modalities = models.CharField(
        max_length=64, blank=True, help_text="Comma-separated, e.g. CR,DX; blank matches any."
    )
    body_part_regex = models.CharField(
        max_length=128, blank=True, help_text="Matched against BodyPartExamined (case-insensitive)."
    )
    sop_class_uids = models.CharField(
        max_length=512, blank=True, help_text="Comma-separated; blank matches any."
    )
    series_description_regex = models.CharField(max_length=128, blank=True)
    view_positions = models.CharField(
        max_length=64, blank=True, help_text="Comma-separated, e.g. PA,AP; blank matches any."
    )
    min_instances = models.PositiveIntegerField(
        default=0, help_text="Fewer instances: the series is reported as not analysed."
    )
    task = models.CharField(max_length=8, choices=Task.choices)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.PER_SERIES)

    class Meta:
        ordering = ["priority", "pk"]

    def __str__(self) -> str:
        return f"{self.name} → {self.task} {self.mode}"


class InferenceJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"
        SUPERSEDED = "superseded", "superseded"

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="jobs")
    series_revision = models.PositiveIntegerField()
    task = models.CharField(max_length=8, choices=Task.choices)
    mode = models.CharField(max_length=16, choices=Mode.choices)
    routing_rule = models.ForeignKey(
        RoutingRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    # Set when a request asked for a specific model; otherwise the active model(s) of the task.
    requested_model = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"Job #{self.pk} {self.task} {self.mode} ({self.status})"


class Prediction(models.Model):
    class Status(models.TextChoices):
        ANALYSED = "analysed", "analysed"
        NOT_ANALYSED = "not_analysed", "not analysed"

    job = models.ForeignKey(InferenceJob, on_delete=models.CASCADE, related_name="predictions")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="predictions")
    instance = models.ForeignKey(
        Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="predictions"
    )
    slice_index = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    reason = models.CharField(max_length=255, blank=True, help_text="Why it was not analysed.")
    label = models.CharField(max_length=64, blank=True, db_index=True)
    probabilities = models.JSONField(default=dict, blank=True)
    probability = models.FloatField(null=True, blank=True, help_text="Of the positive label.")
    threshold = models.FloatField(null=True, blank=True)
    model_name = models.CharField(max_length=64)
    model_version = models.CharField(max_length=32)
    # Comma-separated for an ensemble, one sha256 per member.
    model_sha256 = models.CharField(max_length=1024)
    heatmap_path = models.CharField(max_length=255, blank=True)
    boxes = models.JSONField(default=list, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    superseded = models.BooleanField(default=False, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"Prediction #{self.pk} {self.label or self.status}"


class Review(models.Model):
    """A radiologist's verdict on a prediction; reviewed results become training labels."""

    class Verdict(models.TextChoices):
        AGREE = "agree", "agree"
        DISAGREE = "disagree", "disagree"
        CORRECTED = "corrected", "corrected label"

    prediction = models.ForeignKey(Prediction, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews"
    )
    verdict = models.CharField(max_length=16, choices=Verdict.choices)
    corrected_label = models.CharField(max_length=64, blank=True)
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"Review #{self.pk} {self.verdict}"


class AuditEvent(models.Model):
    """Who looked at or exported which patient's AI results, and when."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=32, db_index=True)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    patient = models.ForeignKey(
        Patient, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    path = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"{self.action} {self.object_type} #{self.object_id}"


class OutboxItem(models.Model):
    """One DICOM result object to send to one destination; sent exactly once."""

    class Kind(models.TextChoices):
        STRUCTURED_REPORT = "sr", "structured report"
        SECONDARY_CAPTURE = "sc", "secondary capture"

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        SENT = "sent", "sent"
        FAILED = "failed", "failed"

    job = models.ForeignKey(InferenceJob, on_delete=models.CASCADE, related_name="outbox")
    destination = models.ForeignKey(DicomNode, on_delete=models.PROTECT, related_name="outbox")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    # Fixed when the object is made, so a retry re-sends the same instance, never a copy.
    sop_instance_uid = models.CharField(max_length=64)
    file_path = models.CharField(max_length=255, help_text="Relative to INFERENCE_OUTPUT_DIR.")
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["destination", "sop_instance_uid"], name="unique_outbox_per_destination"
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} → {self.destination} ({self.status})"

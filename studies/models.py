"""What a PACS sent us: patients, studies, series, instances, and who may send."""

from __future__ import annotations

from django.db import models


class Patient(models.Model):
    patient_id = models.CharField(max_length=64, db_index=True)
    issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=324, blank=True)
    birth_date = models.DateField(null=True, blank=True)
    sex = models.CharField(max_length=16, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["patient_id", "issuer_of_patient_id"], name="unique_patient_per_issuer"
            )
        ]

    def __str__(self) -> str:
        return f"Patient #{self.pk}"


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=64, unique=True)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    study_date = models.DateField(null=True, blank=True, db_index=True)
    accession_number = models.CharField(max_length=64, blank=True, db_index=True)
    description = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return f"Study #{self.pk} ({self.study_date or 'no date'})"


class Series(models.Model):
    class Status(models.TextChoices):
        RECEIVING = "receiving", "receiving"
        COMPLETE = "complete", "complete"

    series_instance_uid = models.CharField(max_length=64, unique=True)
    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="series")
    modality = models.CharField(max_length=16, db_index=True)
    body_part_examined = models.CharField(max_length=64, blank=True)
    series_description = models.CharField(max_length=64, blank=True)
    series_number = models.IntegerField(null=True, blank=True)
    view_position = models.CharField(max_length=16, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.RECEIVING, db_index=True
    )
    # Bumped each time an instance arrives after the series was complete, so later work can
    # tell which results a re-opened series supersedes.
    revision = models.PositiveIntegerField(default=1)
    first_received_at = models.DateTimeField()
    last_received_at = models.DateTimeField(db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "series"
        indexes = [models.Index(fields=["status", "last_received_at"])]

    def __str__(self) -> str:
        return f"Series #{self.pk} {self.modality} ({self.status})"


class Instance(models.Model):
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    sop_class_uid = models.CharField(max_length=64)
    instance_number = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    # Relative to DICOM_STORAGE_DIR, built from sanitised UIDs only.
    file_path = models.CharField(max_length=255)
    file_size = models.BigIntegerField()
    received_at = models.DateTimeField(db_index=True)
    calling_ae = models.CharField(max_length=16)

    def __str__(self) -> str:
        return f"Instance #{self.pk} ({self.instance_number})"


class DicomNode(models.Model):
    """A remote application entity: a PACS or modality that may store, and/or a destination."""

    name = models.CharField(max_length=64, unique=True)
    ae_title = models.CharField(max_length=16, db_index=True)
    host = models.CharField(max_length=255, help_text="Host name or IP, used to send results.")
    port = models.PositiveIntegerField(default=104)
    may_store = models.BooleanField(default=True, help_text="May send us studies.")
    restrict_to_ip = models.GenericIPAddressField(
        null=True, blank=True, help_text="If set, associations are accepted only from this IP."
    )
    is_destination = models.BooleanField(default=False, help_text="Receives our AI results.")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class AssociationLog(models.Model):
    class Outcome(models.TextChoices):
        RELEASED = "released", "released"
        ABORTED = "aborted", "aborted"
        REJECTED = "rejected", "rejected"

    calling_ae = models.CharField(max_length=16)
    called_ae = models.CharField(max_length=16)
    peer_ip = models.GenericIPAddressField(null=True)
    started_at = models.DateTimeField(db_index=True)
    ended_at = models.DateTimeField()
    instances_stored = models.PositiveIntegerField(default=0)
    instances_failed = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    detail = models.CharField(max_length=255, blank=True)

    def __str__(self) -> str:
        return f"{self.calling_ae} {self.outcome} {self.started_at:%Y-%m-%d %H:%M:%S}"

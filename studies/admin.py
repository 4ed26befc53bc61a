"""Admin for ingest: built to stay fast with 100k instances (select_related, raw ids, no counts)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from studies.models import AssociationLog, DicomNode, Instance, Patient, Series, Study


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin[Patient]):
    list_display = ["id", "patient_id", "issuer_of_patient_id", "sex", "birth_date", "created_at"]
    search_fields = ["=patient_id"]
    show_full_result_count = False


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin[Study]):
    list_display = ["id", "study_date", "accession_number", "description", "patient", "created_at"]
    list_filter = ["study_date"]
    list_select_related = ["patient"]
    raw_id_fields = ["patient"]
    search_fields = ["=patient__patient_id", "=accession_number", "=study_instance_uid"]
    date_hierarchy = "study_date"
    show_full_result_count = False


@admin.register(Series)
class SeriesAdmin(admin.ModelAdmin[Series]):
    list_display = [
        "id",
        "modality",
        "body_part_examined",
        "series_description",
        "status",
        "revision",
        "last_received_at",
        "completed_at",
        "study",
    ]
    list_filter = ["status", "modality", "last_received_at"]
    list_select_related = ["study"]
    raw_id_fields = ["study"]
    search_fields = [
        "=series_instance_uid",
        "=study__study_instance_uid",
        "=study__accession_number",
        "=study__patient__patient_id",
    ]
    readonly_fields = ["first_received_at", "last_received_at", "completed_at", "revision"]
    show_full_result_count = False


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin[Instance]):
    list_display = [
        "id",
        "instance_number",
        "sop_class_uid",
        "transfer_syntax_uid",
        "file_size",
        "calling_ae",
        "received_at",
        "series",
    ]
    list_filter = ["series__modality", "received_at", "calling_ae"]
    list_select_related = ["series"]
    raw_id_fields = ["series"]
    search_fields = [
        "=sop_instance_uid",
        "=series__series_instance_uid",
        "=series__study__study_instance_uid",
        "=series__study__accession_number",
        "=series__study__patient__patient_id",
    ]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # instances only come in over DICOM


@admin.register(DicomNode)
class DicomNodeAdmin(admin.ModelAdmin[DicomNode]):
    list_display = [
        "name",
        "ae_title",
        "host",
        "port",
        "may_store",
        "restrict_to_ip",
        "is_destination",
    ]
    list_filter = ["may_store", "is_destination"]
    search_fields = ["name", "ae_title", "host"]


@admin.register(AssociationLog)
class AssociationLogAdmin(admin.ModelAdmin[AssociationLog]):
    list_display = [
        "started_at",
        "calling_ae",
        "peer_ip",
        "outcome",
        "instances_stored",
        "instances_failed",
        "detail",
    ]
    list_filter = ["outcome", "started_at", "calling_ae"]
    search_fields = ["calling_ae", "peer_ip"]
    date_hierarchy = "started_at"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: AssociationLog | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: AssociationLog | None = None
    ) -> bool:
        return False

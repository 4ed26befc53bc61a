"""Admin for the model registry, routing, jobs and AI results.

Built to stay fast with 100k jobs and predictions (select_related, raw ids, no full counts).
Model files and their sha256s are never edited here: ``manage.py register_model`` writes them,
and a model becomes active or retired only through the actions, which call the services.
Jobs and predictions are records of what ran: they are read here, never written by hand.
"""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.text import Truncator

from inference.models import (
    NOT_FOR_DIAGNOSTIC_USE,
    InferenceJob,
    ModelVersion,
    Prediction,
    RoutingRule,
    Task,
)
from inference.selectors import active_models
from inference.services import job_requeue, model_version_activate

SERIES_SEARCH_FIELDS = [
    "=series__series_instance_uid",
    "=series__study__study_instance_uid",
    "=series__study__accession_number",
    "=series__study__patient__patient_id",
]


def _names(model_versions: list[ModelVersion]) -> str:
    return ", ".join(f"{m.name} {m.version}" for m in model_versions) or "none"


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin[ModelVersion]):
    list_display = [
        "name",
        "version",
        "task",
        "architecture",
        "status",
        "threshold",
        "ensemble_weight",
        "created_at",
        "activated_at",
    ]
    list_filter = ["task", "status"]
    search_fields = ["name", "version"]
    ordering = ["task", "-created_at"]
    # What describes the files (and the files themselves) is fixed at registration; the status
    # changes only through the actions. The operating point and documentation stay editable.
    fields = [
        ("name", "version", "status"),
        ("task", "architecture"),
        ("class_labels", "positive_label"),
        ("threshold", "ensemble_weight"),
        "preprocessing",
        ("onnx_path", "onnx_sha256"),
        ("weights_path", "weights_sha256"),
        "metrics",
        "model_card",
        ("created_at", "activated_at"),
    ]
    readonly_fields = [
        "name",
        "version",
        "status",
        "task",
        "architecture",
        "class_labels",
        "positive_label",
        "preprocessing",
        "onnx_path",
        "onnx_sha256",
        "weights_path",
        "weights_sha256",
        "created_at",
        "activated_at",
    ]
    actions = ["activate", "retire"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # registered with `manage.py register_model`, which copies and hashes files

    def has_delete_permission(self, request: HttpRequest, obj: ModelVersion | None = None) -> bool:
        return False  # the registry records which files made past results; retire instead

    @admin.action(
        description=(
            "Activate selected model versions (the other versions of their task retire; "
            "several selected of one task become a weighted ensemble)"
        ),
        permissions=["change"],
    )
    def activate(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        """Make the selected versions exactly the active set of each of their tasks."""
        by_task: dict[str, list[ModelVersion]] = {}
        for model_version in queryset.order_by("task", "pk"):
            by_task.setdefault(model_version.task, []).append(model_version)
        with transaction.atomic():
            for task, members in by_task.items():
                retired = list(
                    active_models(task=task).exclude(pk__in=[member.pk for member in members])
                )
                for position, member in enumerate(members):
                    model_version_activate(model_version=member, ensemble=position > 0)
                ensemble = " (ensemble)" if len(members) > 1 else ""
                self.message_user(
                    request,
                    f"{Task(task).label}: active {_names(members)}{ensemble}; "
                    f"retired {_names(retired)}.",
                    messages.SUCCESS,
                )

    @admin.action(description="Retire selected model versions", permissions=["change"])
    def retire(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        """Retire the selected versions and warn about each task left without an active one."""
        tasks = sorted(set(queryset.values_list("task", flat=True)))
        count = queryset.exclude(status=ModelVersion.Status.RETIRED).update(
            status=ModelVersion.Status.RETIRED
        )
        self.message_user(request, f"Retired {count} model version(s).", messages.SUCCESS)
        for task in tasks:
            if not active_models(task=task).exists():
                self.message_user(
                    request,
                    f"{Task(task).label} has no active model: its series are reported as not "
                    "analysed until one is activated.",
                    messages.WARNING,
                )


class RoutingRuleForm(forms.ModelForm[RoutingRule]):
    """A routing rule whose regular expressions compile as the router will use them."""

    class Meta:
        model = RoutingRule
        fields = [
            "name",
            "priority",
            "enabled",
            "modalities",
            "body_part_regex",
            "sop_class_uids",
            "series_description_regex",
            "view_positions",
            "min_instances",
            "task",
            "mode",
        ]

    def clean_body_part_regex(self) -> str:
        return _compilable(self.cleaned_data["body_part_regex"])

    def clean_series_description_regex(self) -> str:
        return _compilable(self.cleaned_data["series_description_regex"])


def _compilable(pattern: str) -> str:
    """``pattern`` unchanged if it compiles case-insensitively; ValidationError otherwise."""
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise forms.ValidationError(f"Not a valid regular expression: {error}.") from error
    return pattern


@admin.register(RoutingRule)
class RoutingRuleAdmin(admin.ModelAdmin[RoutingRule]):
    form = RoutingRuleForm
    list_display = [
        "name",
        "enabled",
        "priority",
        "task",
        "mode",
        "modalities",
        "body_part_regex",
        "series_description_regex",
        "view_positions",
        "sop_class_uids",
        "min_instances",
    ]
    list_editable = ["enabled", "priority"]
    list_filter = ["enabled", "task", "mode"]
    search_fields = ["name"]


@admin.register(InferenceJob)
class InferenceJobAdmin(admin.ModelAdmin[InferenceJob]):
    list_display = [
        "id",
        "series",
        "task",
        "mode",
        "status",
        "attempts",
        "created_at",
        "finished_at",
        "short_error",
    ]
    list_filter = ["status", "task", "mode"]
    list_select_related = ["series"]
    raw_id_fields = ["series", "routing_rule", "requested_model"]
    search_fields = SERIES_SEARCH_FIELDS
    ordering = ["-created_at"]
    show_full_result_count = False
    actions = ["requeue"]

    @admin.display(description="error")
    def short_error(self, job: InferenceJob) -> str:
        return Truncator(job.error).chars(80)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs come from routing, the API or the sweeper

    def has_change_permission(self, request: HttpRequest, obj: InferenceJob | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: InferenceJob | None = None) -> bool:
        return False  # a job is the record of how its predictions were made

    def has_requeue_permission(self, request: HttpRequest) -> bool:
        """Re-queueing changes a job, so it takes the change permission the form does not use."""
        return request.user.has_perm(f"{self.opts.app_label}.change_{self.opts.model_name}")

    @admin.action(description="Re-queue failed jobs", permissions=["requeue"])
    def requeue(self, request: HttpRequest, queryset: QuerySet[InferenceJob]) -> None:
        """Queue the selected failed jobs again; the others are left as they are."""
        selected = list(queryset)
        requeued = sum(job_requeue(job=job) for job in selected)
        self.message_user(request, f"Re-queued {requeued} failed job(s).", messages.SUCCESS)
        if requeued < len(selected):
            self.message_user(
                request,
                f"{len(selected) - requeued} selected job(s) had not failed and were left as "
                "they are.",
                messages.WARNING,
            )


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin[Prediction]):
    list_display = [
        "id",
        "series",
        "label",
        "probability",
        "threshold",
        "status",
        "reason",
        "model_name",
        "model_version",
        "superseded",
        "created_at",
    ]
    list_filter = ["status", "label", "superseded", "model_name"]
    list_select_related = ["series"]
    search_fields = SERIES_SEARCH_FIELDS
    ordering = ["-created_at"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Prediction | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Prediction | None = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The list, titled with the notice that these results are not for diagnostic use."""
        context = {"title": f"Predictions: {NOT_FOR_DIAGNOSTIC_USE}", **(extra_context or {})}
        return super().changelist_view(request, context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """One prediction, titled with the notice that it is not for diagnostic use."""
        context = {"title": f"Prediction: {NOT_FOR_DIAGNOSTIC_USE}", **(extra_context or {})}
        return super().change_view(request, object_id, form_url, context)

"""Admin for the model registry, routing, jobs, AI results and their review.

Built to stay fast with 100k jobs and predictions (select_related, raw ids, no full counts).
Model files and their sha256s are never edited here: ``manage.py register_model`` writes them,
and a model becomes active or retired only through the actions, which call the services.
Jobs and predictions are records of what ran: they are read here, never written by hand.

The prediction list is the radiologists' worklist: the image and its heatmap side by side, the
AI result with its model, the latest review, and a review page per result (``review_views``).
Radiologists are active staff users in the group ``radiologist``: they may view and review
results without any model permission (the admin lets in staff users only). Every view of a
patient's results is recorded as an AuditEvent, which is shown here read-only.
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Exists, F, OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.text import Truncator

from inference import reports, review_views
from inference.export import outbox_resend
from inference.models import (
    NOT_FOR_DIAGNOSTIC_USE,
    AuditEvent,
    InferenceJob,
    ModelVersion,
    OutboxItem,
    Prediction,
    Review,
    RoutingRule,
    Task,
)
from inference.selectors import active_models
from inference.services import (
    audit_record,
    audit_record_many,
    job_requeue,
    model_version_activate,
    reviewed_training_set_export,
)

RADIOLOGIST_GROUP = "radiologist"

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


class ReviewFilter(admin.SimpleListFilter):
    title = "review"
    parameter_name = "review"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, str]]:
        return [
            ("unreviewed", "waiting for review"),
            ("reviewed", "reviewed"),
            ("disagreements", "radiologist disagrees"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        """Waiting: analysed, current and never reviewed; disagreements: by the latest review."""
        reviews = Review.objects.filter(prediction=OuterRef("pk"))
        if self.value() == "unreviewed":
            return queryset.filter(~Exists(reviews), status=Prediction.Status.ANALYSED).filter(
                superseded=False
            )
        if self.value() == "reviewed":
            return queryset.filter(Exists(reviews))
        if self.value() == "disagreements":
            return queryset.filter(
                latest_verdict__in=[Review.Verdict.DISAGREE, Review.Verdict.CORRECTED]
            )
        return queryset


class ResultFilter(admin.SimpleListFilter):
    title = "AI result"
    parameter_name = "result"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, str]]:
        return [("positive", "positive"), ("negative", "negative")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        """Positive: the positive label's probability reached the threshold."""
        if self.value() == "positive":
            return queryset.filter(probability__gte=F("threshold"))
        if self.value() == "negative":
            return queryset.filter(probability__lt=F("threshold"))
        return queryset


def is_radiologist(request: HttpRequest) -> bool:
    """Whether the user is an active staff member of the radiologist group (asked once per
    request: the admin checks permissions many times per page)."""
    cached: bool | None = getattr(request, "_pacs_ai_radiologist", None)
    if cached is None:
        user = request.user
        cached = bool(
            user.is_active and user.is_staff and user.groups.filter(name=RADIOLOGIST_GROUP).exists()
        )
        request._pacs_ai_radiologist = cached  # type: ignore[attr-defined]
    return cached


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin[Prediction]):
    """The worklist of AI results and their review; results themselves are read-only."""

    list_display = [
        "id",
        "images",
        "label",
        "probability_shown",
        "threshold",
        "model_shown",
        "latest_review",
        "status",
        "reason",
        "superseded",
        "series",
        "created_at",
    ]
    list_filter = [
        ReviewFilter,
        ResultFilter,
        "status",
        "label",
        "superseded",
        "model_name",
    ]
    list_select_related = ["series__study"]
    list_per_page = 25
    raw_id_fields = ["job", "series", "instance"]
    search_fields = SERIES_SEARCH_FIELDS
    ordering = ["-created_at"]
    show_full_result_count = False
    actions = ["download_excel_report", "export_training_set"]
    fields = [
        "images",
        ("label", "probability", "threshold"),
        "probabilities",
        ("model_name", "model_version"),
        "model_sha256",
        ("status", "reason"),
        "reviews_shown",
        ("job", "series", "instance", "slice_index"),
        "heatmap_path",
        "boxes",
        "timings",
        ("superseded", "created_at"),
    ]
    readonly_fields = ["images", "reviews_shown"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Prediction]:
        """Predictions with their latest review's verdict, label, reviewer and time."""
        latest = Review.objects.filter(prediction=OuterRef("pk")).order_by("-created_at", "-pk")
        return (
            super()
            .get_queryset(request)
            .annotate(
                latest_verdict=Subquery(latest.values("verdict")[:1]),
                latest_corrected_label=Subquery(latest.values("corrected_label")[:1]),
                latest_reviewer=Subquery(latest.values("reviewer__username")[:1]),
                latest_reviewed_at=Subquery(latest.values("created_at")[:1]),
            )
        )

    def get_list_display(self, request: HttpRequest) -> list[Any]:
        """The columns, with a link to each result's review page that comes back to this page."""
        if not self.has_review_permission(request):
            return list(self.list_display)
        back = urlencode({"next": request.get_full_path()})

        @admin.display(description="review")
        def review_link(prediction: Prediction) -> str:
            if prediction.status != Prediction.Status.ANALYSED:
                return ""
            url = reverse(
                f"{self.admin_site.name}:inference_prediction_review", args=[prediction.pk]
            )
            return format_html('<a class="button" href="{}?{}">Review</a>', url, back)

        columns = list(self.list_display)
        columns.insert(columns.index("latest_review") + 1, review_link)
        return columns

    @admin.display(description="image | heatmap")
    def images(self, prediction: Prediction) -> str:
        urls = review_views.image_urls(prediction, admin_site_name=self.admin_site.name)
        if not urls["thumbnail_url"]:
            return "-"
        heatmap = (
            format_html(
                '<img class="ai-heatmap" src="{}" alt="heatmap of prediction {}">',
                urls["heatmap_url"],
                prediction.pk,
            )
            if urls["heatmap_url"]
            else format_html('<span class="ai-none">{}</span>', "no heatmap")
        )
        return format_html(
            '<div class="ai-pair"><img class="ai-image" src="{}" alt="image of prediction {}">'
            "{}</div>",
            urls["thumbnail_url"],
            prediction.pk,
            heatmap,
        )

    @admin.display(description="probability", ordering="probability")
    def probability_shown(self, prediction: Prediction) -> str:
        return "-" if prediction.probability is None else f"{prediction.probability:.3f}"

    @admin.display(description="model", ordering="model_name")
    def model_shown(self, prediction: Prediction) -> str:
        return f"{prediction.model_name} {prediction.model_version}"

    @admin.display(description="latest review")
    def latest_review(self, prediction: Prediction) -> str:
        verdict = getattr(prediction, "latest_verdict", None)
        if not verdict:
            return "-"
        corrected = getattr(prediction, "latest_corrected_label", "")
        reviewed_at = getattr(prediction, "latest_reviewed_at", None)
        return format_html(
            "{}{} <br><small>{}, {}</small>",
            Review.Verdict(verdict).label,
            f": {corrected}" if corrected else "",
            getattr(prediction, "latest_reviewer", ""),
            f"{timezone.localtime(reviewed_at):%Y-%m-%d %H:%M}" if reviewed_at else "",
        )

    @admin.display(description="reviews")
    def reviews_shown(self, prediction: Prediction) -> str:
        reviews = prediction.reviews.select_related("reviewer").order_by("-created_at", "-pk")
        rows = [
            (
                review.get_verdict_display(),
                f": {review.corrected_label}" if review.corrected_label else "",
                review.reviewer.get_username(),
                f"{timezone.localtime(review.created_at):%Y-%m-%d %H:%M}",
                f" ({review.comment})" if review.comment else "",
            )
            for review in reviews
        ]
        if not rows:
            return "none"
        return format_html("<ul>{}</ul>", format_html_join("", "<li>{}{} by {} at {}{}</li>", rows))

    def get_urls(self) -> list[URLPattern]:
        """The review page and the two images of a prediction, behind the admin's login."""
        views = [
            ("review/", review_views.review, "review"),
            ("thumbnail.png", review_views.thumbnail, "thumbnail"),
            ("heatmap.png", review_views.heatmap, "heatmap"),
        ]
        return [
            path(
                f"<int:pk>/{suffix}",
                self.admin_site.admin_view(functools.partial(view, model_admin=self)),
                name=f"inference_prediction_{name}",
            )
            for suffix, view, name in views
        ] + super().get_urls()

    def has_module_permission(self, request: HttpRequest) -> bool:
        return is_radiologist(request) or super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Prediction | None = None) -> bool:
        return is_radiologist(request) or super().has_view_permission(request, obj)

    def has_review_permission(self, request: HttpRequest) -> bool:
        """Radiologists, and users with the permission to add reviews, review and export."""
        return is_radiologist(request) or request.user.has_perm(f"{self.opts.app_label}.add_review")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Prediction | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Prediction | None = None) -> bool:
        return False

    @admin.action(description="Download the selected results as an Excel report")
    def download_excel_report(
        self, request: HttpRequest, queryset: QuerySet[Prediction]
    ) -> HttpResponse:
        """The report the API and ``manage.py report`` give, for the selected results (audited
        as an export of each patient's results)."""
        rows = reports.rows_from_predictions(queryset.order_by("pk"))
        patients = set(queryset.values_list("series__study__patient_id", flat=True))
        for patient_id in patients:
            audit_record(
                user=request.user,
                action="export",
                object_type="report",
                object_id=len(rows),
                patient_id=patient_id,
                path=request.path,
            )
        response = HttpResponse(
            reports.render(rows, fmt="xlsx"),
            content_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        )
        response["Content-Disposition"] = 'attachment; filename="pacs-ai-report.xlsx"'
        return response

    @admin.action(
        description="Export the reviewed among the selected results as a training set",
        permissions=["review"],
    )
    def export_training_set(self, request: HttpRequest, queryset: QuerySet[Prediction]) -> None:
        """Write the reviewed results to a new folder under the data directory (see
        ``reviewed_training_set_export`` for the format) and say where."""
        try:
            export = reviewed_training_set_export(predictions=queryset, exported_by=request.user)
        except ValueError as error:
            self.message_user(request, str(error), messages.WARNING)
            return
        counts = ", ".join(f"{label} {count}" for label, count in sorted(export.counts.items()))
        self.message_user(
            request,
            f"Exported {export.rows} reviewed {export.task} result(s) ({counts}) to "
            f"{export.folder}.",
            messages.SUCCESS,
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The worklist, under the notice that these results are not for diagnostic use; each
        result shown is audited as viewed."""
        context = {
            "title": f"AI results: {NOT_FOR_DIAGNOSTIC_USE}",
            "notice": NOT_FOR_DIAGNOSTIC_USE,
            **(extra_context or {}),
        }
        response = super().changelist_view(request, context)
        if isinstance(response, TemplateResponse) and "cl" in (response.context_data or {}):
            audit_record_many(
                user=request.user,
                action="view",
                object_type="prediction",
                objects=(
                    (prediction.pk, prediction.series.study.patient_id)
                    for prediction in response.context_data["cl"].result_list  # type: ignore[index]
                ),
                path=request.get_full_path(),
            )
        return response

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """One prediction with its images and reviews, under the notice that it is not for
        diagnostic use; the view is audited."""
        context = {
            "title": f"Prediction: {NOT_FOR_DIAGNOSTIC_USE}",
            "notice": NOT_FOR_DIAGNOSTIC_USE,
            **(extra_context or {}),
        }
        response = super().change_view(request, object_id, form_url, context)
        prediction = (getattr(response, "context_data", None) or {}).get("original")
        if isinstance(prediction, Prediction):
            audit_record(
                user=request.user,
                action="view",
                object_type="prediction",
                object_id=prediction.pk,
                patient_id=prediction.series.study.patient_id,
                path=request.get_full_path(),
            )
        return response


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin[AuditEvent]):
    """Who viewed or exported which patient's AI results: read-only, never deleted here."""

    list_display = ["created_at", "user", "action", "object_type", "object_id", "patient", "path"]
    list_filter = ["action", "object_type"]
    list_select_related = ["user", "patient"]
    raw_id_fields = ["user", "patient"]
    search_fields = ["=object_id", "=patient__patient_id", "=user__username"]
    ordering = ["-created_at"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False


@admin.register(OutboxItem)
class OutboxItemAdmin(admin.ModelAdmin[OutboxItem]):
    """DICOM result objects on their way to each destination; failed ones can be resent."""

    list_display = [
        "id",
        "job",
        "destination",
        "kind",
        "status",
        "attempts",
        "next_attempt_at",
        "sent_at",
        "short_error",
    ]
    list_filter = ["status", "kind", "destination"]
    list_select_related = ["job", "destination"]
    raw_id_fields = ["job", "destination"]
    readonly_fields = [field.name for field in OutboxItem._meta.fields]
    ordering = ["-created_at"]
    show_full_result_count = False
    actions = ["resend"]

    @admin.display(description="last error")
    def short_error(self, item: OutboxItem) -> str:
        return Truncator(item.last_error).chars(80)

    @admin.action(description="Resend", permissions=["change"])
    def resend(self, request: HttpRequest, queryset: QuerySet[OutboxItem]) -> None:
        items = list(queryset.select_related("job__series__study"))
        for item in items:
            outbox_resend(item=item)
            audit_record(
                user=request.user,
                action="resend",
                object_type="outbox_item",
                object_id=item.pk,
                patient_id=item.job.series.study.patient_id,
                path=request.path,
            )
        self.message_user(request, f"{len(items)} item(s) queued to be sent again.")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: OutboxItem | None = None) -> bool:
        return False

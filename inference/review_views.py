"""Admin views for the radiologists' review of AI results: the source image's thumbnail, the
heatmap, and the review form.

:class:`inference.admin.PredictionAdmin` mounts them with ``get_urls()``, so they sit behind the
admin's login and take its permission checks. Files are found from the prediction row looked up
by its id, never from request input, and every view of a patient's results is audited.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from PIL import Image
from pydicom import dcmread

from inference.models import NOT_FOR_DIAGNOSTIC_USE, Prediction, Review
from inference.preprocessing import NotAnalysable, PreprocessSpec, radiograph_from_dataset
from inference.services import audit_record, prediction_class_labels, review_create
from studies.models import Instance, Series
from studies.storage import storage_root

if TYPE_CHECKING:
    from inference.admin import PredictionAdmin

# The thumbnail is letterboxed into a square like the model input, so it lines up with the
# heatmap of a radiograph drawn on that input.
THUMBNAIL_SPEC = PreprocessSpec(dims=2, size=(384, 384))


class ReviewForm(forms.Form):
    """A verdict on one prediction; the corrected label is one of its model's class labels."""

    verdict = forms.ChoiceField(choices=Review.Verdict.choices, widget=forms.RadioSelect)
    comment = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))

    def __init__(self, *args: Any, labels: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["corrected_label"] = forms.ChoiceField(
            required=False,
            choices=[("", "---------"), *((label, label) for label in labels)],
            help_text="Only with the verdict 'corrected label': the class the image shows.",
        )
        self.order_fields(["verdict", "corrected_label", "comment"])


def heatmap(request: HttpRequest, pk: int, *, model_admin: PredictionAdmin) -> HttpResponseBase:
    """The prediction's heatmap PNG (404 if it has none); the view is audited."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    prediction = _prediction(pk)
    path = _file_under(Path(settings.INFERENCE_OUTPUT_DIR), prediction.heatmap_path)
    _audit_view(request, prediction)
    return FileResponse(path.open("rb"), content_type="image/png")


def thumbnail(request: HttpRequest, pk: int, *, model_admin: PredictionAdmin) -> HttpResponse:
    """A PNG thumbnail of the image the prediction is about: its instance, or the middle slice
    of its series for a series-level result; 404 if there is none. The view is audited."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    prediction = _prediction(pk)
    png = _thumbnail_png(prediction)
    _audit_view(request, prediction)
    return HttpResponse(png, content_type="image/png")


def review(request: HttpRequest, pk: int, *, model_admin: PredictionAdmin) -> HttpResponse:
    """The prediction with its images and reviews, and the form that adds a review.

    A valid POST stores the review and redirects to ``next`` (a local URL: the worklist page it
    came from) or to the worklist; a page shown is audited as a view.
    """
    if not model_admin.has_review_permission(request):
        raise PermissionDenied
    prediction = _prediction(pk)
    changelist_url = reverse(f"{model_admin.admin_site.name}:inference_prediction_changelist")
    next_url = request.POST.get("next") or request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        next_url = ""
    form = ReviewForm(
        request.POST if request.method == "POST" else None,
        labels=prediction_class_labels(prediction=prediction),
    )
    if form.is_valid():
        try:
            review_create(
                prediction=prediction,
                reviewer=request.user,  # type: ignore[arg-type]
                verdict=form.cleaned_data["verdict"],
                corrected_label=form.cleaned_data["corrected_label"],
                comment=form.cleaned_data["comment"],
            )
        except ValidationError as error:
            form.add_error(None, error)
        else:
            messages.success(request, f"Review of prediction #{prediction.pk} saved.")
            return HttpResponseRedirect(next_url or changelist_url)
    _audit_view(request, prediction)
    urls = image_urls(prediction, admin_site_name=model_admin.admin_site.name)
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": Prediction._meta,
        "title": f"Review of prediction #{prediction.pk}",
        "notice": NOT_FOR_DIAGNOSTIC_USE,
        "prediction": prediction,
        "probabilities": sorted(prediction.probabilities.items()),
        "reviews": prediction.reviews.select_related("reviewer").order_by("-created_at", "-pk"),
        "form": form,
        "next": next_url,
        "changelist_url": changelist_url,
        **urls,
    }
    return TemplateResponse(request, "admin/inference/prediction/review.html", context)


def image_urls(prediction: Prediction, *, admin_site_name: str) -> dict[str, str]:
    """``thumbnail_url`` and ``heatmap_url`` of an analysed prediction ("" where there is none)."""
    if prediction.status != Prediction.Status.ANALYSED:
        return {"thumbnail_url": "", "heatmap_url": ""}
    heatmap_url = (
        reverse(f"{admin_site_name}:inference_prediction_heatmap", args=[prediction.pk])
        if prediction.heatmap_path
        else ""
    )
    return {
        "thumbnail_url": reverse(
            f"{admin_site_name}:inference_prediction_thumbnail", args=[prediction.pk]
        ),
        "heatmap_url": heatmap_url,
    }


def _prediction(pk: int) -> Prediction:
    return get_object_or_404(Prediction.objects.select_related("series__study", "instance"), pk=pk)


def _audit_view(request: HttpRequest, prediction: Prediction) -> None:
    audit_record(
        user=request.user,
        action="view",
        object_type="prediction",
        object_id=prediction.pk,
        patient_id=prediction.series.study.patient_id,
        path=request.get_full_path(),
    )


def _file_under(root: Path, relative: str) -> Path:
    """``root / relative`` when that is a file inside ``root``; Http404 otherwise."""
    if not relative:
        raise Http404("No such file.")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise Http404("No such file.")
    return path


def _thumbnail_png(prediction: Prediction) -> bytes:
    instance = prediction.instance or _middle_instance(prediction.series)
    if instance is None:
        raise Http404("The series has no image.")
    dataset = dcmread(_file_under(storage_root(), instance.file_path))
    try:
        unit = radiograph_from_dataset(dataset, THUMBNAIL_SPEC)[0]
    except NotAnalysable as error:
        raise Http404(error.reason) from error
    buffer = BytesIO()
    Image.fromarray(np.round(unit * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _middle_instance(series: Series) -> Instance | None:
    instances = series.instances.order_by("instance_number", "pk")
    count = instances.count()
    return instances[count // 2] if count else None

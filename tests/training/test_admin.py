"""Training runs in the admin: listed with their test metrics, never edited by hand."""

from __future__ import annotations

import pytest
from django.urls import reverse

from training.models import TrainingRun

pytestmark = pytest.mark.django_db


def test_runs_are_listed_with_their_test_metrics_and_are_read_only(admin_client):
    run = TrainingRun.objects.create(
        name="cxr-pneumonia", version="9", task="cxr2d", architecture="resnet10",
        status=TrainingRun.Status.SUCCEEDED, run_dir="/runs/9", epochs_done=12, best_epoch=9,
        metrics={"test": {"accuracy": 0.951, "recall": 0.962, "precision": 0.97, "roc_auc": 0.99}},
    )  # fmt: skip

    listing = admin_client.get(reverse("admin:training_trainingrun_changelist"))
    assert listing.status_code == 200
    text = listing.content.decode()
    assert "cxr-pneumonia" in text
    assert "accuracy 0.951, recall 0.962, precision 0.970, roc_auc 0.990" in text

    detail = admin_client.get(reverse("admin:training_trainingrun_change", args=[run.pk]))
    assert detail.status_code == 200
    assert b'name="_save"' not in detail.content
    assert admin_client.get(reverse("admin:training_trainingrun_add")).status_code == 403

"""The inference admin: lists and filters with bounded queries, the registry and job actions, and
AI results shown read-only with their not-for-diagnostic-use notice."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from inference.models import (
    NOT_FOR_DIAGNOSTIC_USE,
    InferenceJob,
    ModelVersion,
    Prediction,
    RoutingRule,
)
from inference.services import RUN_INFERENCE_TASK
from pacs_ai.celery import app as celery_app
from studies import services as studies_services
from tests.factories import encode, make_dataset

pytestmark = pytest.mark.django_db

LONG_ERROR = "RuntimeError: CUDA out of memory. " + "x" * 300 + " END-OF-ERROR"
ROWS = 15  # enough that one query per row would break the query bounds below


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path):
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"


@pytest.fixture
def results(register_model):
    """An active model, a disabled routing rule, and for each of ROWS series a succeeded job with
    its prediction, plus a failed job; one prediction is superseded, one not analysed."""
    model = register_model("cxr2d")
    RoutingRule.objects.create(name="disabled", enabled=False, task="cxr2d")
    for number in range(ROWS):
        series = studies_services.instance_store(
            data=encode(make_dataset(Modality="CR")), calling_ae="MODALITY"
        ).series
        job = InferenceJob.objects.create(
            series=series, series_revision=1, task="cxr2d", mode="per_series", status="succeeded"
        )
        analysed = number > 0
        Prediction.objects.create(
            job=job,
            series=series,
            status="analysed" if analysed else "not_analysed",
            reason="" if analysed else "Not a chest radiograph.",
            label="PNEUMONIA" if number % 2 else ("NORMAL" if analysed else ""),
            probability=0.9 if number % 2 else 0.1,
            threshold=0.5,
            model_name=model.name,
            model_version=model.version,
            model_sha256=model.onnx_sha256,
            superseded=number == 2,
        )
    InferenceJob.objects.create(
        series=series,
        series_revision=1,
        task="cxr2d",
        mode="per_series",
        status="failed",
        attempts=3,
        error=LONG_ERROR,
    )
    return model


def run_action(client, model: str, action: str, pks: list[int]):
    return client.post(
        reverse(f"admin:inference_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in pks]},
        follow=True,
    )


def texts(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@pytest.mark.parametrize(
    ("model", "query", "count"),
    [
        ("modelversion", {}, 1),
        ("modelversion", {"task__exact": "cxr2d", "status__exact": "active"}, 1),
        ("modelversion", {"task__exact": "ct3d"}, 0),
        ("routingrule", {"enabled__exact": "0", "task__exact": "cxr2d"}, 1),
        ("inferencejob", {}, ROWS + 1),
        ("inferencejob", {"status__exact": "failed", "task__exact": "cxr2d"}, 1),
        ("inferencejob", {"mode__exact": "per_slice"}, 0),
        ("prediction", {}, ROWS),
        ("prediction", {"label": "PNEUMONIA"}, ROWS // 2),
        ("prediction", {"status__exact": "not_analysed"}, 1),
        ("prediction", {"superseded__exact": "1"}, 1),
        ("prediction", {"model_name": "tiny-cxr2d", "superseded__exact": "0"}, ROWS - 1),
    ],
)
def test_changelists_filter_with_a_bounded_number_of_queries(
    admin_client, results, django_assert_max_num_queries, model, query, count
):
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse(f"admin:inference_{model}_changelist"), query)

    assert response.status_code == 200
    assert response.context["cl"].result_count == count


@pytest.mark.parametrize("model", [ModelVersion, RoutingRule, InferenceJob, Prediction])
def test_detail_pages_load(admin_client, results, django_assert_max_num_queries, model):
    row = model._default_manager.first()
    assert row is not None
    url = reverse(f"admin:inference_{model._meta.model_name}_change", args=[row.pk])

    with django_assert_max_num_queries(15):
        response = admin_client.get(url)

    assert response.status_code == 200


def test_model_files_and_sha256s_are_shown_but_not_editable(admin_client, results):
    url = reverse("admin:inference_modelversion_change", args=[results.pk])

    page = admin_client.get(url).content.decode()
    admin_client.post(
        url,
        {
            "threshold": "0.7",
            "ensemble_weight": "1",
            "metrics": "{}",
            "model_card": "{}",
            "onnx_sha256": "0" * 64,
            "onnx_path": "elsewhere.onnx",
            "status": "retired",
        },
    )

    assert results.onnx_sha256 in page
    assert results.weights_sha256 in page
    assert 'name="onnx_sha256"' not in page
    assert 'name="weights_path"' not in page
    stored = ModelVersion.objects.get(pk=results.pk)
    assert stored.threshold == 0.7
    assert (stored.onnx_sha256, stored.onnx_path, stored.status) == (
        results.onnx_sha256,
        results.onnx_path,
        "active",
    )
    assert admin_client.get(reverse("admin:inference_modelversion_add")).status_code == 403


def test_activating_a_version_retires_the_previous_active_one(admin_client, register_model):
    first = register_model("cxr2d", version="1")
    second = register_model("cxr2d", version="2", activate=False)

    response = run_action(admin_client, "modelversion", "activate", [second.pk])

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == ("retired", "active")
    assert second.activated_at is not None
    assert "retired tiny-cxr2d 1" in " ".join(texts(response))


def test_activating_several_of_one_task_makes_them_an_ensemble(admin_client, register_model):
    old = register_model("cxr2d", version="1")
    members = [register_model("cxr2d", version=v, activate=False) for v in ("2", "3")]
    other_task = register_model("ct3d")

    run_action(admin_client, "modelversion", "activate", [m.pk for m in members])

    statuses = dict(ModelVersion.objects.values_list("pk", "status"))
    assert statuses[old.pk] == "retired"
    assert [statuses[m.pk] for m in members] == ["active", "active"]
    assert statuses[other_task.pk] == "active"


def test_retiring_the_last_active_version_warns(admin_client, register_model):
    model = register_model("cxr2d")

    response = run_action(admin_client, "modelversion", "retire", [model.pk])

    model.refresh_from_db()
    assert model.status == "retired"
    assert any("has no active model" in text for text in texts(response))


def test_requeue_puts_a_failed_job_back_on_the_inference_queue(
    admin_client, results, django_capture_on_commit_callbacks
):
    failed = InferenceJob.objects.get(status="failed")
    succeeded = InferenceJob.objects.filter(status="succeeded").first()
    assert succeeded is not None
    drain_inference_queue()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = run_action(admin_client, "inferencejob", "requeue", [failed.pk, succeeded.pk])

    failed.refresh_from_db()
    assert (failed.status, failed.attempts, failed.error) == ("queued", 0, "")
    assert InferenceJob.objects.get(pk=succeeded.pk).status == "succeeded"
    assert len(callbacks) == 1
    assert drain_inference_queue() == [(RUN_INFERENCE_TASK, [failed.pk])]
    assert "Re-queued 1 failed job(s)." in texts(response)
    assert any("had not failed" in text for text in texts(response))


def drain_inference_queue() -> list[tuple[str, list[int]]]:
    """Take every message off the "inference" queue: (task name, args) for each."""
    taken: list[tuple[str, list[int]]] = []
    with celery_app.connection_for_read() as connection:
        queue = connection.SimpleQueue("inference")
        try:
            while True:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    return taken
                taken.append((message.headers["task"], message.payload[0]))
                message.ack()
        finally:
            queue.close()


def test_a_job_shows_its_whole_error_and_cannot_be_added_or_edited(admin_client, results):
    failed = InferenceJob.objects.get(status="failed")
    url = reverse("admin:inference_inferencejob_change", args=[failed.pk])

    listing = admin_client.get(
        reverse("admin:inference_inferencejob_changelist"), {"status__exact": "failed"}
    ).content.decode()
    page = admin_client.get(url).content.decode()

    assert "CUDA out of memory" in listing
    assert "END-OF-ERROR" not in listing
    assert "END-OF-ERROR" in page
    assert 'name="error"' not in page
    assert admin_client.post(url, {"error": "", "status": "queued"}).status_code == 403
    assert admin_client.get(reverse("admin:inference_inferencejob_add")).status_code == 403
    failed.refresh_from_db()
    assert failed.status == "failed"


def test_prediction_pages_say_not_for_diagnostic_use_and_are_read_only(admin_client, results):
    prediction = Prediction.objects.filter(label="PNEUMONIA").first()
    assert prediction is not None
    url = reverse("admin:inference_prediction_change", args=[prediction.pk])

    listing = admin_client.get(reverse("admin:inference_prediction_changelist"))
    page = admin_client.get(url)

    for response in (listing, page):
        assert NOT_FOR_DIAGNOSTIC_USE in response.content.decode()
    assert results.onnx_sha256 in page.content.decode()
    assert 'name="label"' not in page.content.decode()
    assert admin_client.post(url, {"label": "NORMAL"}).status_code == 403
    assert admin_client.get(reverse("admin:inference_prediction_add")).status_code == 403
    delete = reverse("admin:inference_prediction_delete", args=[prediction.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert Prediction.objects.get(pk=prediction.pk).label == "PNEUMONIA"


def test_a_routing_rule_with_a_broken_regex_is_refused(admin_client):
    data = {
        "name": "lateral",
        "priority": "5",
        "enabled": "on",
        "modalities": "DX",
        "body_part_regex": "CHEST|(THORAX",
        "sop_class_uids": "",
        "series_description_regex": "lat",
        "view_positions": "LL",
        "min_instances": "0",
        "task": "cxr2d",
        "mode": "per_series",
    }

    refused = admin_client.post(reverse("admin:inference_routingrule_add"), data)
    accepted = admin_client.post(
        reverse("admin:inference_routingrule_add"), {**data, "body_part_regex": "CHEST|THORAX"}
    )

    assert refused.status_code == 200
    assert "Not a valid regular expression" in refused.content.decode()
    assert accepted.status_code == 302
    assert RoutingRule.objects.get(name="lateral").body_part_regex == "CHEST|THORAX"


def test_routing_rules_are_enabled_and_ordered_from_the_list(admin_client):
    rule = RoutingRule.objects.order_by("pk").first()
    assert rule is not None
    assert rule.enabled
    total = RoutingRule.objects.count()
    forms = {
        "form-TOTAL_FORMS": str(total),
        "form-INITIAL_FORMS": str(total),
        "_save": "Save",
    }
    for index, other in enumerate(RoutingRule.objects.all()):
        forms[f"form-{index}-id"] = str(other.pk)
        forms[f"form-{index}-priority"] = "7" if other.pk == rule.pk else str(other.priority)
        if other.enabled and other.pk != rule.pk:
            forms[f"form-{index}-enabled"] = "on"

    response = admin_client.post(reverse("admin:inference_routingrule_changelist"), forms)

    assert response.status_code == 302
    rule.refresh_from_db()
    assert (rule.enabled, rule.priority) == (False, 7)


def test_a_failed_outbox_item_can_be_resent(admin_client, django_capture_on_commit_callbacks):
    from inference.models import OutboxItem
    from studies.models import DicomNode

    series = studies_services.instance_store(
        data=encode(make_dataset(Modality="CR")), calling_ae="MODALITY"
    ).series
    job = InferenceJob.objects.create(
        series=series, series_revision=1, task="cxr2d", mode="per_series", status="succeeded"
    )
    node = DicomNode.objects.create(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                                    is_destination=True)  # fmt: skip
    item = OutboxItem.objects.create(
        job=job, destination=node, kind="sr", sop_instance_uid="1.2.3", file_path="x.dcm",
        status="failed", attempts=8, last_error="connection refused",
    )  # fmt: skip
    url = reverse("admin:inference_outboxitem_changelist")
    assert admin_client.get(url).status_code == 200

    with django_capture_on_commit_callbacks() as callbacks:
        admin_client.post(url, {"action": "resend", "_selected_action": [item.pk]})

    item.refresh_from_db()
    assert (item.status, item.attempts, item.last_error) == ("queued", 0, "")
    assert len(callbacks) == 1


def test_the_selected_results_download_as_the_excel_report(admin_client, results):
    from io import BytesIO

    from openpyxl import load_workbook

    from inference.models import AuditEvent

    pks = list(Prediction.objects.values_list("pk", flat=True))
    response = admin_client.post(
        reverse("admin:inference_prediction_changelist"),
        {"action": "download_excel_report", "_selected_action": pks},
    )

    assert response.status_code == 200
    sheet = load_workbook(BytesIO(response.content)).worksheets[0]
    header = [cell.value for cell in sheet[1]]
    assert header == [
        "path_to_study", "study_uid", "series_uid", "probability_of_pathology", "pathology",
        "processing_status", "time_of_processing",
    ]  # fmt: skip
    assert sheet.max_row == len(pks) + 1
    assert AuditEvent.objects.filter(action="export", object_type="report").exists()

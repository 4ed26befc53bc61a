"""The results API: authentication and roles, filters, AI results with their model and notice,
heatmaps, re-runs and re-queues that reach the queue, model activation, reports, audit rows,
and an OpenAPI schema that validates."""

from __future__ import annotations

import datetime as dt
from io import BytesIO

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse
from django.utils import timezone
from openapi_spec_validator import validate
from openpyxl import load_workbook
from pydicom import dcmread
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from inference import services
from inference.api.permissions import INTEGRATOR, RADIOLOGIST, ensure_roles
from inference.models import (
    NOT_FOR_DIAGNOSTIC_USE,
    AuditEvent,
    InferenceJob,
    ModelVersion,
    Prediction,
    Review,
)
from inference.pipeline import job_run
from inference.services import RUN_INFERENCE_TASK
from pacs_ai.celery import app as celery_app
from studies import services as studies_services
from studies.models import Series
from tests.factories import CR_JPEG, encode, make_dataset
from tests.inference.conftest import LABELS, SPECS

pytestmark = pytest.mark.django_db

LIST_URLS = ["studies", "series", "jobs", "predictions", "models", "reports"]


@pytest.fixture(autouse=True)
def files(settings, tmp_path):
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"
    settings.INFERENCE_GRADCAM = "always"


def user_with(name: str, *roles: str, **fields) -> User:
    ensure_roles()
    user = User.objects.create_user(username=name, **fields)
    user.groups.add(*Group.objects.filter(name__in=roles))
    return user


def token_client(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def radiologist() -> APIClient:
    return token_client(user_with("rad", RADIOLOGIST))


@pytest.fixture
def integrator() -> APIClient:
    return token_client(user_with("int", INTEGRATOR))


@pytest.fixture
def administrator() -> APIClient:
    return token_client(user_with("boss", is_staff=True, is_superuser=True))


def store_series(**tags) -> Series:
    dataset = make_dataset(**{"Modality": "CR", "BodyPartExamined": "CHEST", **tags})
    return studies_services.instance_store(data=encode(dataset), calling_ae="MODALITY").series


def complete(series: Series) -> Series:
    Series.objects.filter(pk=series.pk).update(status="complete", completed_at=timezone.now())
    series.refresh_from_db()
    return series


def predict(series: Series, model: ModelVersion, *, label: str, **fields) -> Prediction:
    job = InferenceJob.objects.create(
        series=series,
        series_revision=1,
        task=model.task,
        mode="per_series",
        status="succeeded",
    )
    return Prediction.objects.create(
        job=job,
        series=series,
        status="analysed",
        label=label,
        probability=0.8 if label == "PNEUMONIA" else 0.2,
        threshold=0.5,
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.onnx_sha256,
        **fields,
    )


@pytest.fixture
def analysed(register_model) -> Prediction:
    """A radiograph stored, routed and analysed by a tiny real model, heatmap included."""
    register_model("cxr2d")
    ds = dcmread(CR_JPEG)
    series = studies_services.instance_store(data=encode(ds), calling_ae="MODALITY").series
    job = services.series_route(series=complete(series))
    assert job is not None
    job_run(job_id=job.pk)
    prediction = Prediction.objects.get(job=job)
    assert prediction.heatmap_path
    return prediction


def model_row(task: str = "cxr2d", *, version: str = "1", status: str = "active") -> ModelVersion:
    """A registry row without model files, for tests that never run the model."""
    return ModelVersion.objects.create(
        name=f"tiny-{task}",
        version=version,
        task=task,
        architecture="r3d_18" if task == "ct3d" else "resnet18",
        class_labels=LABELS[task],
        positive_label=LABELS[task][1],
        threshold=0.5,
        preprocessing=SPECS[task].to_dict(),
        onnx_sha256=f"{task}-{version}".encode().hex().ljust(64, "0"),
        weights_sha256="0" * 64,
        status=status,
    )


@pytest.fixture
def results():
    """Four radiograph series: two with pneumonia, one reviewed, on different study dates; one
    model other than the active one; a CT series that is still receiving."""
    model = model_row()
    other = model_row(version="2", status="candidate")
    rows = {
        "a": predict(store_series(StudyDate="20260105", PatientID="P-A"), model, label="PNEUMONIA"),
        "b": predict(store_series(StudyDate="20260110", PatientID="P-B"), model, label="NORMAL"),
        "c": predict(
            store_series(StudyDate="20260120", PatientID="P-C", Modality="DX"),
            other,
            label="PNEUMONIA",
        ),
        "d": predict(store_series(StudyDate="20260125", PatientID="P-D"), model, label="NORMAL"),
    }
    reviewer = user_with("reviewer", RADIOLOGIST)
    Review.objects.create(prediction=rows["b"], reviewer=reviewer, verdict="agree")
    store_series(Modality="CT")
    return rows


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


def ids(response) -> set[int]:
    assert response.status_code == 200, response.content
    return {row["id"] for row in response.json()["results"]}


# --- authentication and roles -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        *(f"/api/{name}/" for name in LIST_URLS),
        "/api/predictions/1/",
        "/api/predictions/1/heatmap/",
        "/api/series/1/slices/",
        "/api/schema/?format=json",
        "/api/docs/",
    ],
)
def test_anonymous_requests_get_401(url):
    response = APIClient().get(url)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("url", ["/api/series/1/rerun/", "/api/jobs/1/requeue/"])
def test_anonymous_writes_get_401(url):
    assert APIClient().post(url, {}, format="json").status_code == 401


def test_a_token_and_a_session_both_authenticate(results):
    user = user_with("both", RADIOLOGIST)
    session = APIClient()
    session.force_login(user)

    assert len(ids(token_client(user).get("/api/predictions/"))) == 4
    assert len(ids(session.get("/api/predictions/"))) == 4


def test_without_a_role_a_user_reads_the_registry_but_no_results(results):
    client = token_client(user_with("nobody"))

    assert client.get("/api/models/").status_code == 200
    for name in ("studies", "series", "jobs", "predictions", "reports"):
        assert client.get(f"/api/{name}/").status_code == 403


# --- AI results ---------------------------------------------------------------------------------


def test_a_prediction_names_its_model_says_not_diagnostic_and_is_audited(analysed, radiologist):
    url = f"/api/predictions/{analysed.pk}/"

    body = radiologist.get(url).json()

    model = ModelVersion.objects.get(name="tiny-cxr2d")
    assert body["label"] == analysed.label
    assert body["probability"] == pytest.approx(analysed.probability)
    assert (body["model_name"], body["model_version"]) == ("tiny-cxr2d", "1")
    assert body["model_sha256"] == model.onnx_sha256
    assert body["notice"] == NOT_FOR_DIAGNOSTIC_USE
    assert body["heatmap"].endswith(f"/api/predictions/{analysed.pk}/heatmap/")
    event = AuditEvent.objects.get()
    assert (event.user_id, event.action, event.object_type) == (
        User.objects.get(username="rad").pk,
        "view",
        "prediction",
    )
    assert event.object_id == str(analysed.pk)
    assert event.patient_id == analysed.series.study.patient_id
    assert event.path == url


def test_the_heatmap_is_streamed_as_png_with_its_model_and_audited(analysed, radiologist):
    response = radiologist.get(f"/api/predictions/{analysed.pk}/heatmap/", HTTP_ACCEPT="image/png")

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    path = settings.INFERENCE_OUTPUT_DIR / analysed.heatmap_path
    assert b"".join(response.streaming_content) == path.read_bytes()
    assert response["X-AI-Notice"] == NOT_FOR_DIAGNOSTIC_USE
    assert response["X-Model-Sha256"] == analysed.model_sha256
    event = AuditEvent.objects.get()
    assert (event.object_type, event.object_id) == ("heatmap", str(analysed.pk))


def test_no_heatmap_is_a_json_404_even_when_only_png_is_accepted(results, radiologist):
    url = f"/api/predictions/{results['a'].pk}/heatmap/"

    response = radiologist.get(url, HTTP_ACCEPT="image/png")

    assert response.status_code == 404
    assert response.json() == {"detail": "This prediction has no heatmap."}
    assert not AuditEvent.objects.exists()


def test_a_heatmap_path_outside_the_output_folder_is_never_served(results, radiologist, tmp_path):
    (tmp_path / "outside.png").write_bytes(b"\x89PNG not yours")
    Prediction.objects.filter(pk=results["a"].pk).update(heatmap_path="../outside.png")

    response = radiologist.get(f"/api/predictions/{results['a'].pk}/heatmap/")

    assert response.status_code == 404


def test_a_series_shows_its_current_results_and_the_view_is_audited(results, radiologist):
    series = results["a"].series
    predict(series, ModelVersion.objects.get(version="1"), label="NORMAL", superseded=True)

    body = radiologist.get(f"/api/series/{series.pk}/").json()

    assert [p["id"] for p in body["predictions"]] == [results["a"].pk]
    assert body["predictions"][0]["notice"] == NOT_FOR_DIAGNOSTIC_USE
    event = AuditEvent.objects.get()
    assert (event.object_type, event.patient_id) == ("series", series.study.patient_id)


def test_slices_list_each_slice_of_the_newest_per_slice_job(results, radiologist):
    series = results["a"].series
    model = ModelVersion.objects.get(version="1")
    older, newer = (
        InferenceJob.objects.create(
            series=series, series_revision=1, task="cxr2d", mode="per_slice", status="succeeded"
        )
        for _ in range(2)
    )
    for job in (older, newer):
        for index in (2, 0, 1):
            Prediction.objects.create(
                job=job, series=series, slice_index=index, status="analysed",
                label="PNEUMONIA" if index == 1 else "NORMAL", probability=index / 4,
                model_name=model.name, model_version=model.version,
                model_sha256=model.onnx_sha256,
            )  # fmt: skip

    newest = radiologist.get(f"/api/series/{series.pk}/slices/").json()["results"]
    chosen = radiologist.get(f"/api/series/{series.pk}/slices/?job={older.pk}").json()["results"]

    assert [(s["slice_index"], s["probability"], s["label"]) for s in newest] == [
        (0, 0.0, "NORMAL"),
        (1, 0.25, "PNEUMONIA"),
        (2, 0.5, "NORMAL"),
    ]
    assert {s["job"] for s in newest} == {newer.pk}
    assert {s["job"] for s in chosen} == {older.pk}
    assert all(s["notice"] == NOT_FOR_DIAGNOSTIC_USE for s in newest)
    assert newest[0]["model_sha256"] == model.onnx_sha256
    assert AuditEvent.objects.filter(object_type="series", action="view").count() == 2


# --- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("label=pneumonia", {"a", "c"}),
        ("modality=DX", {"c"}),
        ("model_version=2", {"c"}),
        ("model_name=tiny-cxr2d&model_version=1", {"a", "b", "d"}),
        ("reviewed=true", {"b"}),
        ("reviewed=false", {"a", "c", "d"}),
        ("study_date_after=2026-01-10&study_date_before=2026-01-20", {"b", "c"}),
        ("status=not_analysed", set()),
        ("per_slice=true", set()),
    ],
)
def test_predictions_filter(results, radiologist, query, expected):
    found = ids(radiologist.get(f"/api/predictions/?{query}"))

    assert found == {results[key].pk for key in expected}


def test_predictions_filter_by_the_day_they_were_made(results, radiologist):
    Prediction.objects.filter(pk=results["d"].pk).update(
        created_at=timezone.now() - dt.timedelta(days=3)
    )
    today = timezone.localdate().isoformat()

    assert ids(radiologist.get(f"/api/predictions/?created_after={today}")) == {
        results[key].pk for key in "abc"
    }


def test_series_studies_and_jobs_filter_by_their_results(results, radiologist):
    def series_of(*keys: str) -> set[int]:
        return {results[key].series_id for key in keys}

    assert ids(radiologist.get("/api/series/?label=PNEUMONIA")) == series_of("a", "c")
    assert ids(radiologist.get("/api/series/?reviewed=true")) == series_of("b")
    assert ids(radiologist.get("/api/series/?status=receiving&modality=CT")) == {
        Series.objects.get(modality="CT").pk
    }
    assert ids(radiologist.get("/api/studies/?modality=DX")) == {results["c"].series.study_id}
    assert ids(radiologist.get("/api/studies/?study_date_after=2026-01-20&model_version=1")) == {
        results["d"].series.study_id
    }
    assert ids(radiologist.get("/api/jobs/?label=NORMAL&status=succeeded")) == {
        results[key].job_id for key in "bd"
    }
    assert radiologist.get("/api/predictions/?study_date_after=yesterday").status_code == 400


def test_lists_are_paged(results, radiologist):
    body = radiologist.get("/api/predictions/?limit=3").json()

    assert body["count"] == 4
    assert len(body["results"]) == 3
    assert "offset=3" in body["next"]


# --- re-run and re-queue ------------------------------------------------------------------------


def test_a_radiologist_cannot_rerun_a_series(results, radiologist):
    series = complete(results["a"].series)

    assert radiologist.post(f"/api/series/{series.pk}/rerun/").status_code == 403
    assert not InferenceJob.objects.filter(status="queued").exists()


def test_an_integrator_reruns_a_series_and_the_job_is_queued_on_commit(
    results, integrator, django_capture_on_commit_callbacks
):
    series = complete(results["a"].series)
    drain_inference_queue()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = integrator.post(f"/api/series/{series.pk}/rerun/", {}, format="json")

    assert response.status_code == 202
    job = InferenceJob.objects.get(pk=response.json()["id"])
    assert (job.series_id, job.task, job.mode, job.status) == (
        series.pk,
        "cxr2d",
        "per_series",
        "queued",
    )
    assert job.routing_rule is not None
    assert job.requested_model is None
    assert len(callbacks) == 1
    assert drain_inference_queue() == [(RUN_INFERENCE_TASK, [job.pk])]


def test_a_rerun_may_ask_for_a_model_and_a_mode(results, integrator):
    series = complete(results["a"].series)
    candidate = ModelVersion.objects.get(version="2")

    response = integrator.post(
        f"/api/series/{series.pk}/rerun/",
        {"model": candidate.pk, "mode": "per_slice"},
        format="json",
    )

    assert response.status_code == 202
    job = InferenceJob.objects.get(pk=response.json()["id"])
    assert (job.requested_model, job.task, job.mode) == (candidate, "cxr2d", "per_slice")


def test_a_rerun_with_a_model_of_another_task_is_refused(results, integrator):
    series = complete(results["a"].series)
    ct_model = model_row("ct3d")

    response = integrator.post(
        f"/api/series/{series.pk}/rerun/", {"model": ct_model.pk}, format="json"
    )

    assert response.status_code == 400
    assert "ct3d" in response.json()["detail"]
    assert not InferenceJob.objects.filter(requested_model=ct_model).exists()


def test_a_series_still_receiving_is_not_rerun(results, integrator):
    series = Series.objects.get(modality="CT")

    response = integrator.post(f"/api/series/{series.pk}/rerun/", {}, format="json")

    assert response.status_code == 400
    assert "receiving" in response.json()["detail"]


def test_an_integrator_requeues_only_a_failed_job(
    results, integrator, radiologist, django_capture_on_commit_callbacks
):
    failed = results["a"].job
    InferenceJob.objects.filter(pk=failed.pk).update(status="failed", error="boom", attempts=3)
    drain_inference_queue()

    assert radiologist.post(f"/api/jobs/{failed.pk}/requeue/").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        response = integrator.post(f"/api/jobs/{failed.pk}/requeue/")
    again = integrator.post(f"/api/jobs/{results['b'].job_id}/requeue/")

    assert response.status_code == 202
    assert (response.json()["status"], response.json()["attempts"]) == ("queued", 0)
    assert drain_inference_queue() == [(RUN_INFERENCE_TASK, [failed.pk])]
    assert again.status_code == 409


# --- model registry -----------------------------------------------------------------------------


def test_only_an_administrator_activates_a_model_version(
    results, radiologist, integrator, administrator
):
    first = ModelVersion.objects.get(version="1")
    second = ModelVersion.objects.get(version="2")
    url = f"/api/models/{second.pk}/activate/"
    staff_radiologist = token_client(user_with("staff-rad", RADIOLOGIST, is_staff=True))

    assert radiologist.post(url).status_code == 403
    assert integrator.post(url).status_code == 403
    assert staff_radiologist.post(url).status_code == 403  # staff may use the admin, no more
    response = administrator.post(url, {}, format="json")

    assert response.status_code == 200
    assert response.json()["status"] == "active"
    first.refresh_from_db()
    assert first.status == "retired"


def test_a_user_given_the_admin_permission_may_activate(results):
    user = user_with("registrar", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="change_modelversion"))
    second = ModelVersion.objects.get(version="2")

    response = token_client(user).post(f"/api/models/{second.pk}/activate/")

    assert response.status_code == 200
    assert ModelVersion.objects.get(pk=second.pk).status == "active"


def test_an_administrator_adds_a_version_to_an_ensemble(results, administrator):
    first = ModelVersion.objects.get(version="1")
    second = ModelVersion.objects.get(version="2")

    administrator.post(f"/api/models/{second.pk}/activate/", {"ensemble": True}, format="json")

    statuses = set(ModelVersion.objects.values_list("status", flat=True))
    assert statuses == {"active"}
    assert first.pk in ids(administrator.get("/api/models/?status=active&task=cxr2d"))


# --- reports ------------------------------------------------------------------------------------


def test_a_json_report_holds_the_filtered_results_and_each_patient_export_is_audited(
    results, radiologist
):
    response = radiologist.get("/api/reports/?format=json&label=PNEUMONIA")

    assert response.status_code == 200
    body = response.json()
    assert body["notice"] == NOT_FOR_DIAGNOSTIC_USE
    assert {item["series_uid"] for item in body["items"]} == {
        results[key].series.series_instance_uid for key in "ac"
    }
    assert all(item["notice"] == NOT_FOR_DIAGNOSTIC_USE for item in body["items"])
    events = AuditEvent.objects.filter(action="export", object_type="report")
    patients = {results[key].series.study.patient_id for key in "ac"}
    assert {event.patient_id for event in events} == patients
    assert len(events) == len(patients)


def test_an_excel_report_is_a_workbook_naming_the_models(results, radiologist):
    response = radiologist.get("/api/reports/?format=xlsx&modality=CR")

    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    workbook = load_workbook(BytesIO(response.content))
    assert workbook["results"].max_row == 1 + 3
    model_sheet = [tuple(row) for row in workbook["model"].iter_rows(values_only=True)]
    assert model_sheet[0][:2] == ("notice", NOT_FOR_DIAGNOSTIC_USE)
    model = ModelVersion.objects.get(version="1")
    assert (model.name, model.version, model.onnx_sha256) in model_sheet


def test_a_report_leaves_out_superseded_results_unless_asked(results, radiologist):
    Prediction.objects.filter(pk=results["a"].pk).update(superseded=True)

    current = radiologist.get("/api/reports/?format=json").json()["items"]
    everything = radiologist.get("/api/reports/?format=json&superseded=").json()["items"]

    assert len(current) == 3
    assert len(everything) == 4


def test_an_unknown_report_format_is_a_json_400(results, radiologist):
    response = radiologist.get("/api/reports/?format=pdf")

    assert response.status_code == 400
    assert "format" in response.json()


# --- OpenAPI ------------------------------------------------------------------------------------


def test_the_schema_validates_and_every_operation_has_an_example(radiologist):
    response = radiologist.get("/api/schema/?format=json")

    assert response.status_code == 200
    schema = response.json()
    validate(schema)
    operations = {
        (method, path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    assert ("post", "/api/series/{id}/rerun/") in operations
    assert ("get", "/api/predictions/{id}/heatmap/") in operations
    without_examples = [
        key for key, operation in operations.items() if "examples" not in str(operation)
    ]
    assert without_examples == []


def test_the_docs_page_is_served_to_a_signed_in_user():
    client = APIClient()
    client.force_login(user_with("reader"))

    response = client.get(reverse("docs"))

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
    # Served from this host (the sidecar package), not a CDN a hospital network cannot reach.
    assert b"cdn" not in response.content.lower()
    assert b"/static/drf_spectacular_sidecar/" in response.content

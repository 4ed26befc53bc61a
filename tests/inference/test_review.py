"""Radiologist review in the admin: the worklist, the images, the review form, the audit log,
the reviewed training set, and who may see any of it."""

from __future__ import annotations

import csv
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.contrib.messages import get_messages
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from inference import review_views, services
from inference.models import NOT_FOR_DIAGNOSTIC_USE, AuditEvent, InferenceJob, Prediction, Review
from inference.pipeline import job_run
from inference.preprocessing import radiograph_from_dataset
from studies import services as studies_services
from studies.models import Series
from studies.storage import storage_root
from tests.factories import CR_JPEG, CT_SERIES, encode, make_dataset

pytestmark = pytest.mark.django_db

LABELS = ["NORMAL", "PNEUMONIA"]
CHANGELIST = "admin:inference_prediction_changelist"


@pytest.fixture(autouse=True)
def folders(settings, tmp_path):
    """Models, heatmaps and exports of each test in a folder of its own; heatmaps always."""
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"
    settings.PACS_AI_DATA_DIR = tmp_path
    settings.INFERENCE_GRADCAM = "always"


def make_user(username: str, *, staff: bool = True, group: str | None = "radiologist") -> User:
    user = User.objects.create_user(username=username, password="not-a-real-password-1")
    user.is_staff = staff
    user.save()
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


def client_for(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def radiologist() -> User:
    return make_user("rad")


@pytest.fixture
def rad_client(radiologist) -> Client:
    return client_for(radiologist)


def store_radiograph(*, patient_id: str = "CXR-0001") -> Series:
    """The real chest radiograph, stored as a new study of ``patient_id``."""
    ds = dcmread(CR_JPEG)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = patient_id
    return studies_services.instance_store(data=encode(ds), calling_ae="MODALITY").series


def analysed_radiograph(*, patient_id: str = "CXR-0001") -> Prediction:
    """A real prediction with its heatmap: a stored radiograph routed and run in-process."""
    job = services.series_route(series=store_radiograph(patient_id=patient_id))
    assert job is not None
    job_run(job_id=job.pk)
    prediction = Prediction.objects.select_related("series__study").get(job=job)
    assert prediction.status == "analysed", prediction.reason
    assert prediction.heatmap_path
    return prediction


@pytest.fixture
def chest_model(register_model):
    """The active chest X-ray model that :func:`analysed_radiograph` needs."""
    return register_model("cxr2d")


def make_prediction(
    *, label: str = "PNEUMONIA", probability: float | None = 0.9, **fields
) -> Prediction:
    """A prediction row on a small stored instance, without running a model."""
    instance = studies_services.instance_store(
        data=encode(make_dataset(Modality="CR")), calling_ae="MODALITY"
    )
    job = InferenceJob.objects.create(
        series=instance.series, series_revision=1, task="cxr2d", mode="per_series"
    )
    values = {
        "status": "analysed",
        "label": label,
        "probabilities": {"NORMAL": round(1 - (probability or 0), 6), "PNEUMONIA": probability},
        "probability": probability,
        "threshold": 0.5,
        "model_name": "tiny-cxr2d",
        "model_version": "1",
        "model_sha256": "0" * 64,
        **fields,
    }
    return Prediction.objects.create(job=job, series=instance.series, instance=instance, **values)


def sop_uid(prediction: Prediction) -> str:
    assert prediction.instance is not None
    return prediction.instance.sop_instance_uid


def review(prediction: Prediction, reviewer: User, verdict: str, corrected: str = "") -> Review:
    return services.review_create(
        prediction=prediction, reviewer=reviewer, verdict=verdict, corrected_label=corrected
    )


def worklist_pks(client: Client, query: dict[str, str]) -> set[int]:
    response = client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200
    return {prediction.pk for prediction in response.context["cl"].result_list}


# --- the worklist ------------------------------------------------------------------------------


def test_the_worklist_shows_image_and_heatmap_beside_the_ai_result(chest_model, rad_client):
    prediction = analysed_radiograph()
    thumbnail = reverse("admin:inference_prediction_thumbnail", args=[prediction.pk])
    heatmap = reverse("admin:inference_prediction_heatmap", args=[prediction.pk])

    page = rad_client.get(reverse(CHANGELIST)).content.decode()

    assert f'src="{thumbnail}"' in page
    assert f'src="{heatmap}"' in page
    assert prediction.label in page
    assert f"{prediction.probability:.3f}" in page
    assert "tiny-cxr2d 1" in page
    assert page.count(NOT_FOR_DIAGNOSTIC_USE) >= 2  # the title and the notice above it
    assert reverse("admin:inference_prediction_review", args=[prediction.pk]) in page


def test_the_images_are_the_heatmap_file_and_a_thumbnail_of_the_dicom(chest_model, rad_client):
    prediction = analysed_radiograph()

    heatmap = rad_client.get(reverse("admin:inference_prediction_heatmap", args=[prediction.pk]))
    thumbnail = rad_client.get(
        reverse("admin:inference_prediction_thumbnail", args=[prediction.pk])
    )

    assert heatmap["Content-Type"] == thumbnail["Content-Type"] == "image/png"
    heatmap_bytes = b"".join(heatmap.streaming_content)
    assert heatmap_bytes == (settings.INFERENCE_OUTPUT_DIR / prediction.heatmap_path).read_bytes()
    pixels = np.asarray(Image.open(BytesIO(thumbnail.content)))
    assert pixels.shape == (384, 384)
    assert pixels.max() > 128  # the radiograph, not a black square


def test_a_result_without_a_heatmap_file_gets_404_and_no_path_comes_from_the_request(
    rad_client,
):
    escaping = make_prediction(heatmap_path="../../../../etc/passwd")
    missing = make_prediction(heatmap_path="")

    for prediction in (escaping, missing):
        url = reverse("admin:inference_prediction_heatmap", args=[prediction.pk])
        assert rad_client.get(url).status_code == 404
    assert rad_client.get("/admin/inference/prediction/999999/thumbnail.png").status_code == 404


@pytest.fixture
def worklist(radiologist) -> dict[str, Prediction]:
    """Results in every state the filters tell apart."""
    rows = {
        "unreviewed_positive": make_prediction(),
        "agreed_negative": make_prediction(label="NORMAL", probability=0.2),
        "disagreed_positive": make_prediction(probability=0.7),
        "corrected_negative": make_prediction(label="NORMAL", probability=0.4),
        "disagreed_then_agreed": make_prediction(label="NORMAL", probability=0.1),
        "not_analysed": make_prediction(
            status="not_analysed", label="", probabilities={}, probability=None, threshold=None
        ),
        "superseded_unreviewed": make_prediction(superseded=True),
    }
    review(rows["agreed_negative"], radiologist, "agree")
    review(rows["disagreed_positive"], radiologist, "disagree")
    review(rows["corrected_negative"], radiologist, "corrected", "PNEUMONIA")
    review(rows["disagreed_then_agreed"], radiologist, "disagree")
    review(rows["disagreed_then_agreed"], radiologist, "agree")
    return rows


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"review": "unreviewed"}, {"unreviewed_positive"}),
        (
            {"review": "reviewed"},
            {
                "agreed_negative",
                "disagreed_positive",
                "corrected_negative",
                "disagreed_then_agreed",
            },
        ),
        ({"review": "disagreements"}, {"disagreed_positive", "corrected_negative"}),
        (
            {"result": "positive"},
            {"unreviewed_positive", "disagreed_positive", "superseded_unreviewed"},
        ),
        (
            {"result": "negative"},
            {"agreed_negative", "corrected_negative", "disagreed_then_agreed"},
        ),
        ({"result": "positive", "review": "disagreements"}, {"disagreed_positive"}),
    ],
)
def test_the_worklist_filters_unreviewed_disagreements_and_positives(
    rad_client, worklist, django_assert_max_num_queries, query, expected
):
    with django_assert_max_num_queries(14):
        pks = worklist_pks(rad_client, query)

    assert pks == {worklist[name].pk for name in expected}


def test_the_filters_count_their_results_when_asked(rad_client, worklist):
    page = rad_client.get(reverse(CHANGELIST), {"_facets": "True"}).content.decode()

    assert "waiting for review (1)" in page
    assert "radiologist disagrees (2)" in page
    assert "positive (3)" in page


def test_the_worklist_shows_each_results_latest_review(rad_client, worklist):
    page = rad_client.get(reverse(CHANGELIST), {"review": "reviewed"}).content.decode()

    cell = '<td class="field-latest_review">'
    assert page.count(f"{cell}corrected label: PNEUMONIA <br><small>rad, ") == 1
    assert page.count(f"{cell}disagree <br><small>rad, ") == 1  # the other one was revised
    assert page.count(f"{cell}agree <br><small>rad, ") == 2


# --- the review form ---------------------------------------------------------------------------


def review_url(prediction: Prediction) -> str:
    return reverse("admin:inference_prediction_review", args=[prediction.pk])


def test_a_review_is_stored_with_its_reviewer_and_time_and_returns_to_the_worklist(
    rad_client, radiologist
):
    prediction = make_prediction()
    back = reverse(CHANGELIST) + "?review=unreviewed"

    page = rad_client.get(review_url(prediction), {"next": back})
    response = rad_client.post(
        review_url(prediction),
        {"verdict": "corrected", "corrected_label": "NORMAL", "comment": "Old scar.", "next": back},
    )

    assert page.status_code == 200
    assert NOT_FOR_DIAGNOSTIC_USE in page.content.decode()
    assert '<option value="PNEUMONIA">' in page.content.decode()
    assert response.status_code == 302
    assert response["Location"] == back
    stored = Review.objects.get(prediction=prediction)
    assert (stored.reviewer, stored.verdict, stored.corrected_label, stored.comment) == (
        radiologist,
        "corrected",
        "NORMAL",
        "Old scar.",
    )
    assert stored.created_at is not None
    assert rad_client.get(back).context["cl"].result_count == 0


def test_a_review_goes_back_only_to_a_local_page(rad_client):
    prediction = make_prediction()

    response = rad_client.post(
        review_url(prediction), {"verdict": "agree", "next": "https://elsewhere.example/"}
    )

    assert response["Location"] == reverse(CHANGELIST)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"verdict": "corrected", "corrected_label": "COVID"}, "Select a valid choice"),
        ({"verdict": "corrected", "corrected_label": ""}, "one of the model&#x27;s labels"),
        ({"verdict": "corrected", "corrected_label": "PNEUMONIA"}, "choose agree"),
        ({"verdict": "agree", "corrected_label": "NORMAL"}, "goes with the verdict"),
        ({"verdict": "maybe"}, "Select a valid choice"),
        ({}, "This field is required"),
    ],
)
def test_the_review_form_refuses_a_label_that_is_not_the_models(rad_client, data, error):
    prediction = make_prediction()

    response = rad_client.post(review_url(prediction), data)

    assert response.status_code == 200
    assert error in response.content.decode()
    assert not Review.objects.exists()


def test_only_an_analysed_result_can_be_reviewed(radiologist):
    prediction = make_prediction(status="not_analysed", label="", probabilities={})

    with pytest.raises(ValidationError, match="Only analysed"):
        review(prediction, radiologist, "agree")


def test_disagree_needs_the_label_named_on_a_model_of_more_than_two_classes(radiologist):
    prediction = make_prediction(probabilities={"A": 0.1, "B": 0.2, "PNEUMONIA": 0.7})

    with pytest.raises(ValidationError, match="more than two classes"):
        review(prediction, radiologist, "disagree")
    assert review(prediction, radiologist, "corrected", "B").corrected_label == "B"


# --- audit -------------------------------------------------------------------------------------


def audit_rows() -> list[tuple[str, str, str, int | None, str]]:
    return list(
        AuditEvent.objects.order_by("pk").values_list(
            "user__username", "action", "object_id", "patient_id", "path"
        )
    )


def test_every_view_of_a_patients_results_is_audited(chest_model, rad_client):
    first = analysed_radiograph(patient_id="P-1")
    second = analysed_radiograph(patient_id="P-2")
    patients = {p.pk: p.series.study.patient_id for p in (first, second)}
    urls = [
        reverse("admin:inference_prediction_change", args=[first.pk]),
        reverse("admin:inference_prediction_thumbnail", args=[first.pk]),
        reverse("admin:inference_prediction_heatmap", args=[first.pk]),
        review_url(first),
    ]

    rad_client.get(reverse(CHANGELIST), {"review": "unreviewed"})
    listed = audit_rows()
    for url in urls:
        assert rad_client.get(url).status_code == 200

    path = reverse(CHANGELIST) + "?review=unreviewed"
    assert sorted(listed) == sorted(
        ("rad", "view", str(pk), patient, path) for pk, patient in patients.items()
    )
    assert audit_rows()[len(listed) :] == [
        ("rad", "view", str(first.pk), patients[first.pk], url) for url in urls
    ]
    assert len(set(patients.values())) == 2


def test_a_refused_view_is_not_audited_as_seen(chest_model):
    prediction = analysed_radiograph()
    client = client_for(make_user("clerk", group=None))

    client.get(reverse("admin:inference_prediction_heatmap", args=[prediction.pk]))

    assert not AuditEvent.objects.exists()


def test_the_audit_log_is_read_only_in_the_admin(admin_client, rad_client):
    make_prediction()
    rad_client.get(reverse(CHANGELIST))
    event = AuditEvent.objects.get()
    change = reverse("admin:inference_auditevent_change", args=[event.pk])

    listing = admin_client.get(reverse("admin:inference_auditevent_changelist"))
    page = admin_client.get(change)

    assert listing.status_code == page.status_code == 200
    assert 'name="action"' not in page.content.decode()
    assert admin_client.post(change, {"action": "nothing"}).status_code == 403
    assert admin_client.get(reverse("admin:inference_auditevent_add")).status_code == 403
    delete = reverse("admin:inference_auditevent_delete", args=[event.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.get().action == "view"
    assert rad_client.get(reverse("admin:inference_auditevent_changelist")).status_code == 403


# --- the reviewed training set -----------------------------------------------------------------


def read_labels(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == services.TRAINING_SET_COLUMNS
        return list(reader)


def test_reviewed_results_become_a_folder_per_class_training_set(radiologist, tmp_path):
    agreed = make_prediction(label="PNEUMONIA")
    disagreed = make_prediction(label="PNEUMONIA")
    corrected = make_prediction(label="NORMAL", probability=0.3)
    revised = make_prediction(label="NORMAL", probability=0.2)
    unreviewed = make_prediction()
    review(agreed, radiologist, "agree")
    review(disagreed, radiologist, "disagree")
    review(corrected, radiologist, "corrected", "PNEUMONIA")
    review(revised, radiologist, "agree")
    latest = review(revised, make_user("second"), "disagree")
    destination = tmp_path / "sets" / "reviewed"

    export = services.reviewed_training_set_export(
        predictions=Prediction.objects.all(), exported_by=radiologist, destination=destination
    )

    rows = {row["sop_instance_uid"]: row for row in read_labels(destination)}
    expected = {
        agreed: "PNEUMONIA",
        disagreed: "NORMAL",
        corrected: "PNEUMONIA",
        revised: "PNEUMONIA",
    }
    assert set(rows) == {sop_uid(p) for p in expected}
    for prediction, label in expected.items():
        instance = prediction.instance
        assert instance is not None
        row = rows[instance.sop_instance_uid]
        assert row["label"] == label
        assert row["path"] == f"{label}/{instance.sop_instance_uid}.dcm"
        assert (destination / row["path"]).read_bytes() == (
            storage_root() / instance.file_path
        ).read_bytes()
        assert row["series_uid"] == prediction.series.series_instance_uid
        assert row["study_uid"] == prediction.series.study.study_instance_uid
    assert rows[sop_uid(revised)]["reviewer"] == "second"
    assert rows[sop_uid(revised)]["reviewed_at"] == latest.created_at.isoformat()
    assert sop_uid(unreviewed) not in rows
    assert (export.task, export.counts) == ("cxr2d", {"PNEUMONIA": 3, "NORMAL": 1})
    assert sorted(p.name for p in destination.iterdir()) == ["NORMAL", "PNEUMONIA", "labels.csv"]
    assert AuditEvent.objects.filter(action="export", user=radiologist).count() == 4


@pytest.fixture
def ct_volume() -> Prediction:
    """A series-level result on five slices of the real CT series (no model run)."""
    for path in sorted(CT_SERIES.glob("*.dcm"))[:5]:
        series = studies_services.instance_store(
            data=encode(dcmread(path)), calling_ae="MODALITY"
        ).series
    job = InferenceJob.objects.create(
        series=series, series_revision=1, task="ct3d", mode="per_series"
    )
    return Prediction.objects.create(
        job=job, series=series, status="analysed", label="normal",
        probabilities={"normal": 0.8, "pathology": 0.2}, probability=0.2, threshold=0.5,
        model_name="tiny-ct3d", model_version="1", model_sha256="0" * 64,
    )  # fmt: skip


def test_a_ct_volumes_thumbnail_is_its_middle_slice(rad_client, ct_volume):
    middle = ct_volume.series.instances.get(instance_number=3)
    expected = radiograph_from_dataset(
        dcmread(storage_root() / middle.file_path), review_views.THUMBNAIL_SPEC
    )[0]

    response = rad_client.get(reverse("admin:inference_prediction_thumbnail", args=[ct_volume.pk]))

    shown = np.asarray(Image.open(BytesIO(response.content)), np.float32) / 255
    assert np.abs(shown - expected).max() <= 1 / 255


def test_a_reviewed_ct_volume_is_exported_as_a_folder_of_its_slices(
    radiologist, ct_volume, tmp_path
):
    review(ct_volume, radiologist, "disagree")

    services.reviewed_training_set_export(
        predictions=Prediction.objects.all(), exported_by=radiologist, destination=tmp_path / "ct"
    )

    (row,) = read_labels(tmp_path / "ct")
    assert (row["label"], row["path"], row["sop_instance_uid"]) == (
        "pathology",
        f"pathology/{ct_volume.series.series_instance_uid}",
        "",
    )
    assert len(list((tmp_path / "ct" / row["path"]).glob("*.dcm"))) == 5


def test_an_export_of_nothing_reviewed_or_of_two_tasks_writes_nothing(radiologist, tmp_path):
    make_prediction()
    with pytest.raises(ValueError, match="has been reviewed"):
        services.reviewed_training_set_export(
            predictions=Prediction.objects.all(),
            exported_by=radiologist,
            destination=tmp_path / "a",
        )
    chest = make_prediction()
    ct = make_prediction()
    InferenceJob.objects.filter(pk=ct.job_id).update(task="ct3d")
    review(chest, radiologist, "agree")
    review(ct, radiologist, "agree")
    with pytest.raises(ValueError, match="one task at a time"):
        services.reviewed_training_set_export(
            predictions=Prediction.objects.all(),
            exported_by=radiologist,
            destination=tmp_path / "b",
        )
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_the_export_action_writes_the_selected_reviewed_results(rad_client, radiologist):
    chosen, other = make_prediction(), make_prediction()
    review(chosen, radiologist, "agree")
    review(other, radiologist, "agree")

    response = rad_client.post(
        reverse(CHANGELIST),
        {"action": "export_training_set", "_selected_action": [str(chosen.pk)]},
        follow=True,
    )

    (text,) = [str(message) for message in get_messages(response.wsgi_request)]
    assert text.startswith("Exported 1 reviewed cxr2d result(s) (PNEUMONIA 1)")
    (folder,) = (Path(settings.PACS_AI_DATA_DIR) / "training-sets").iterdir()
    assert str(folder) in text
    assert [row["sop_instance_uid"] for row in read_labels(folder)] == [sop_uid(chosen)]


# --- who may see it ----------------------------------------------------------------------------


def result_urls(prediction: Prediction) -> list[str]:
    return [
        reverse(CHANGELIST),
        reverse("admin:inference_prediction_change", args=[prediction.pk]),
        reverse("admin:inference_prediction_thumbnail", args=[prediction.pk]),
        reverse("admin:inference_prediction_heatmap", args=[prediction.pk]),
        review_url(prediction),
    ]


def test_staff_outside_the_radiologist_group_cannot_see_results(chest_model):
    prediction = analysed_radiograph()
    clerk = client_for(make_user("clerk", group=None))
    outsider = client_for(make_user("outsider", staff=False))

    for url in result_urls(prediction):
        assert clerk.get(url).status_code == 403, url
        response = outsider.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login"))
    assert clerk.post(review_url(prediction), {"verdict": "agree"}).status_code == 403
    assert not Review.objects.exists()
    assert "Predictions" not in clerk.get(reverse("admin:index")).content.decode()


def test_a_radiologist_sees_and_reviews_results_but_not_the_registry(chest_model, rad_client):
    prediction = analysed_radiograph()

    for url in result_urls(prediction):
        assert rad_client.get(url).status_code == 200, url
    index = rad_client.get(reverse("admin:app_list", args=["inference"])).content.decode()
    assert "Predictions" in index
    assert "Model versions" not in index
    assert rad_client.get(reverse("admin:inference_modelversion_changelist")).status_code == 403


def test_a_user_allowed_only_to_view_predictions_cannot_review(chest_model):
    prediction = analysed_radiograph()
    viewer = make_user("viewer", group=None)
    viewer.user_permissions.add(Permission.objects.get(codename="view_prediction"))
    client = client_for(viewer)

    assert client.get(reverse(CHANGELIST)).status_code == 200
    assert client.get(review_url(prediction)).status_code == 403
    assert "Review</a>" not in client.get(reverse(CHANGELIST)).content.decode()

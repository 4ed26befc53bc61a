"""A job from a stored series to its prediction rows, run in-process on tiny real models."""

from __future__ import annotations

import numpy as np
import pytest
from django.conf import settings
from PIL import Image
from pydicom import dcmread

from inference import services
from inference.models import InferenceJob, Prediction
from inference.pipeline import job_run
from inference.runners import ModelIntegrityError, runner_for
from studies import services as studies_services
from studies.models import Series
from tests.factories import CR_JPEG, CT_SERIES, encode

pytestmark = pytest.mark.django_db


def store(paths, **changes) -> Series:
    for path in paths:
        ds = dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        instance = studies_services.instance_store(data=encode(ds), calling_ae="MODALITY")
    return instance.series


def route(series: Series) -> InferenceJob:
    job = services.series_route(series=series)
    assert job is not None
    return job


@pytest.fixture(autouse=True)
def heatmaps_always(settings):
    settings.INFERENCE_GRADCAM = "always"


def test_a_chest_radiograph_gets_a_labelled_prediction_with_a_heatmap(register_model):
    model = register_model("cxr2d")
    job = route(store([CR_JPEG]))

    job_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.status == "succeeded"
    prediction = Prediction.objects.get(job=job)
    assert prediction.status == "analysed"
    assert prediction.label in ("NORMAL", "PNEUMONIA")
    assert set(prediction.probabilities) == {"NORMAL", "PNEUMONIA"}
    assert prediction.probability == pytest.approx(prediction.probabilities["PNEUMONIA"])
    assert prediction.threshold == 0.5
    assert (prediction.model_name, prediction.model_version) == ("tiny-cxr2d", "1")
    assert prediction.model_sha256 == model.onnx_sha256
    assert set(prediction.timings) >= {"load", "preprocess", "infer", "explain"}
    heatmap = Image.open(settings.INFERENCE_OUTPUT_DIR / prediction.heatmap_path)
    assert heatmap.size == (64, 64)
    for box in prediction.boxes:  # in the original 1024x1024 image's pixels
        assert 0 <= box["x"] < 1024
        assert 0 < box["width"] <= 1024


def test_the_real_ct_series_gets_one_probability_per_series(register_model):
    register_model("ct3d")
    job = route(store(sorted(CT_SERIES.glob("*.dcm"))))

    job_run(job_id=job.pk)

    prediction = Prediction.objects.get(job=job)
    assert prediction.status == "analysed"
    assert prediction.probability is not None
    assert 0.0 <= prediction.probability <= 1.0
    assert prediction.slice_index is None
    assert prediction.heatmap_path.endswith("montage.png")
    assert (settings.INFERENCE_OUTPUT_DIR / prediction.heatmap_path).exists()


def test_per_slice_mode_gives_each_ct_slice_its_probability(register_model, storage_dir):
    register_model("ct3d")
    series = store(sorted(CT_SERIES.glob("*.dcm")))
    job = services.job_create(series=series, task="ct3d", mode="per_slice")

    job_run(job_id=job.pk)

    slices = Prediction.objects.filter(job=job, slice_index__isnull=False).order_by("slice_index")
    assert slices.count() == 30
    assert len({p.instance_id for p in slices}) == 30
    assert Prediction.objects.filter(job=job, slice_index__isnull=True).count() == 1
    # Feet to head: the slice order follows the patient position, not the instance number.
    files = [storage_dir / p.instance.file_path for p in slices if p.instance is not None]
    positions = [float(dcmread(path).ImagePositionPatient[2]) for path in files]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"BodyPartExamined": "HEAD"}, "body part"),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, "derived"),
    ],
)
def test_a_ct_the_model_must_not_read_is_not_analysed_with_a_reason(
    register_model, changes, reason
):
    register_model("ct3d")
    series = store(sorted(CT_SERIES.glob("*.dcm")), **changes)
    job = services.job_create(series=series, task="ct3d", mode="per_series")

    job_run(job_id=job.pk)

    prediction = Prediction.objects.get(job=job)
    assert prediction.status == "not_analysed"
    assert reason in prediction.reason.lower()
    assert job.__class__.objects.get(pk=job.pk).status == "succeeded"


def test_too_few_slices_is_not_analysed(register_model):
    register_model("ct3d")
    job = route(store(sorted(CT_SERIES.glob("*.dcm"))[:8]))

    job_run(job_id=job.pk)

    prediction = Prediction.objects.get(job=job)
    assert prediction.status == "not_analysed"
    assert "too few" in prediction.reason.lower()


def test_without_an_active_model_the_series_is_not_analysed():
    job = route(store([CR_JPEG]))

    job_run(job_id=job.pk)

    assert "no active model" in Prediction.objects.get(job=job).reason.lower()


def test_running_a_job_twice_leaves_one_set_of_results(register_model):
    register_model("cxr2d")
    job = route(store([CR_JPEG]))

    assert job_run(job_id=job.pk) is not None
    assert job_run(job_id=job.pk) is None  # a second delivery finds it taken

    assert Prediction.objects.filter(job=job).count() == 1


def test_a_late_instance_makes_a_new_job_whose_results_supersede_the_old(register_model):
    register_model("cxr2d")
    series = store([CR_JPEG])
    first = route(series)
    job_run(job_id=first.pk)
    series.refresh_from_db()
    second = route(series)

    job_run(job_id=second.pk)

    old, new = Prediction.objects.get(job=first), Prediction.objects.get(job=second)
    assert old.superseded
    assert not new.superseded


def test_a_weighted_ensemble_averages_the_probabilities(register_model, model_files, tmp_path):
    from tests.inference.conftest import make_model_files

    first = register_model("cxr2d", version="a")
    onnx_b, weights_b, _ = make_model_files("cxr2d", tmp_path, seed=1)
    second = services.model_version_register(
        name="other", version="b", task="cxr2d", architecture="resnet18",
        class_labels=["NORMAL", "PNEUMONIA"], positive_label="PNEUMONIA", threshold=0.5,
        preprocessing=first.preprocessing, onnx_file=onnx_b, weights_file=weights_b,
    )  # fmt: skip
    second.ensemble_weight = 3.0
    second.save()
    services.model_version_activate(model_version=second, ensemble=True)
    job = route(store([CR_JPEG]))

    job_run(job_id=job.pk)

    prediction = Prediction.objects.get(job=job)
    assert prediction.model_name == "tiny-cxr2d+other"
    singles = []
    for model in (first, second):
        single = services.job_create(series=job.series, task="cxr2d", mode="per_series",
                                     requested_model=model)  # fmt: skip
        job_run(job_id=single.pk)
        singles.append(Prediction.objects.get(job=single).probability or 0.0)
    assert prediction.probability == pytest.approx((singles[0] + 3 * singles[1]) / 4, abs=1e-5)


def test_onnx_and_torch_runners_agree(register_model):
    model = register_model("ct3d")
    batch = np.random.default_rng(0).random((1, 1, 16, 32, 32), np.float32)

    onnx = runner_for(model_version=model, kind="onnx").logits(batch)
    torch = runner_for(model_version=model, kind="torch").logits(batch)

    assert np.max(np.abs(onnx - torch)) < 1e-4


def test_a_tampered_model_file_is_refused(tmp_path):
    from tests.inference.conftest import LABELS, SPECS, make_model_files

    onnx_path, weights_path, architecture = make_model_files("cxr2d", tmp_path, seed=2)
    model = services.model_version_register(
        name="tampered", version="1", task="cxr2d", architecture=architecture,
        class_labels=LABELS["cxr2d"], positive_label="PNEUMONIA", threshold=0.5,
        preprocessing=SPECS["cxr2d"].to_dict(), onnx_file=onnx_path, weights_file=weights_path,
    )  # fmt: skip
    path = settings.INFERENCE_MODELS_DIR / model.onnx_path
    path.write_bytes(path.read_bytes() + b"\0")

    with pytest.raises(ModelIntegrityError, match="sha256"):
        runner_for(model_version=model, kind="onnx")

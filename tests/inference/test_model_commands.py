"""``manage.py register_model`` and ``activate_model`` with tiny real model files."""

from __future__ import annotations

import hashlib
import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from inference.models import ModelVersion
from inference.preprocessing import CHEST_CT, CHEST_XRAY
from tests.inference.conftest import SPECS

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def models_dir(settings, tmp_path) -> Path:
    settings.INFERENCE_MODELS_DIR = tmp_path / "models"
    return Path(settings.INFERENCE_MODELS_DIR)


@pytest.fixture
def register(model_files):
    """Run register_model for the tiny network of a task; options override the defaults."""

    def run(task: str = "cxr2d", *flags: str, **options: object) -> str:
        onnx_path, weights_path, architecture = model_files[task]
        labels = "NORMAL,PNEUMONIA" if task == "cxr2d" else "normal,pathology"
        arguments: dict[str, object] = {
            "name": f"tiny-{task}",
            "version": "1",
            "task": task,
            "architecture": architecture,
            "labels": labels,
            "positive": labels.split(",")[1],
            "threshold": "0.5",
            "onnx": str(onnx_path),
            "weights": str(weights_path),
            **options,
        }
        argv = [f"--{key}={value}" for key, value in arguments.items()]
        out = StringIO()
        call_command("register_model", *argv, *flags, stdout=out)
        return out.getvalue()

    return run


def activate(*args: str) -> str:
    out = StringIO()
    call_command("activate_model", *args, stdout=out)
    return out.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_it_registers_a_candidate_and_prints_its_id_and_sha256s(register, model_files, models_dir):
    onnx_path, weights_path, _ = model_files["cxr2d"]

    output = register()

    model = ModelVersion.objects.get(name="tiny-cxr2d", version="1")
    assert f"#{model.pk}" in output
    assert (model.onnx_sha256, model.weights_sha256) == (sha256(onnx_path), sha256(weights_path))
    assert model.onnx_sha256 in output
    assert model.weights_sha256 in output
    assert sha256(models_dir / model.onnx_path) == model.onnx_sha256
    assert sha256(models_dir / model.weights_path) == model.weights_sha256
    assert model.status == "candidate"
    assert model.class_labels == ["NORMAL", "PNEUMONIA"]
    assert model.positive_label == "PNEUMONIA"
    assert model.preprocessing == CHEST_XRAY.to_dict()


def test_ct_models_get_the_chest_ct_preprocessing_by_default(register):
    register("ct3d")

    assert ModelVersion.objects.get().preprocessing == CHEST_CT.to_dict()


def test_preprocessing_card_and_metrics_are_read_from_json(register, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPECS["cxr2d"].to_dict()))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"training_data": "RSNA pneumonia, 2018"}))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"auroc": 0.91}))

    register(preprocessing=str(spec_file), card=str(card), metrics=str(metrics))
    register(version="2", preprocessing='{"dims": 2, "size": [128, 128]}')

    first, second = ModelVersion.objects.order_by("version")
    assert first.preprocessing == SPECS["cxr2d"].to_dict()
    assert first.model_card["training_data"] == "RSNA pneumonia, 2018"
    assert "Not for diagnostic use" in first.model_card["intended_use"]
    assert first.metrics == {"auroc": 0.91}
    assert second.preprocessing["size"] == [128, 128]


def test_activate_makes_it_the_active_model_and_retires_the_previous(register):
    register("cxr2d", "--activate")

    output = register("cxr2d", "--activate", version="2")

    statuses = dict(ModelVersion.objects.values_list("version", "status"))
    assert statuses == {"1": "retired", "2": "active"}
    assert "Retired: tiny-cxr2d 1." in output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"positive": "EFFUSION"}, "'EFFUSION' is not one of the labels"),
        ({"labels": "NORMAL"}, "two or more distinct labels"),
        ({"threshold": "1.5"}, "between 0 and 1"),
        ({"onnx": "/nonexistent/model.onnx"}, "--onnx: no such file"),
        ({"weights": "/nonexistent/model.pt"}, "--weights: no such file"),
        ({"architecture": "r3d_18"}, "r3d_18 is 3D"),
        ({"preprocessing": "{not json"}, "invalid JSON"),
        ({"preprocessing": '{"dims": 2, "size": [64, 64], "gamma": 2}'}, "unknown preprocessing"),
        ({"preprocessing": '{"dims": 2, "size": [64]}'}, "not a valid spec"),
        ({"preprocessing": '{"dims": 3, "size": [8, 8, 8], "window": [0, 1]}'}, "needs 2"),
        ({"preprocessing": "/nonexistent/spec.json"}, "cannot read"),
        ({"metrics": "/nonexistent/metrics.json"}, "cannot read"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(register, options, message):
    with pytest.raises(CommandError, match=message):
        register(**options)

    assert not ModelVersion.objects.exists()


def test_a_card_that_is_not_a_json_object_is_refused(register, tmp_path):
    card = tmp_path / "card.json"
    card.write_text("[1, 2]")

    with pytest.raises(CommandError, match="expected a JSON object"):
        register(card=str(card))


def test_a_duplicate_name_and_version_is_refused_without_touching_its_files(
    register, tmp_path, models_dir
):
    register()
    model = ModelVersion.objects.get()
    impostor = tmp_path / "other.onnx"
    impostor.write_bytes(b"not the registered model")

    with pytest.raises(CommandError, match="registered already"):
        register(onnx=str(impostor))

    assert ModelVersion.objects.count() == 1
    assert sha256(models_dir / model.onnx_path) == model.onnx_sha256


def test_activate_model_switches_the_active_model(register):
    register("cxr2d", "--activate")
    register(version="2")

    output = activate("tiny-cxr2d", "2")

    statuses = dict(ModelVersion.objects.values_list("version", "status"))
    assert statuses == {"1": "retired", "2": "active"}
    assert "Retired: tiny-cxr2d 1." in output


def test_activate_model_with_ensemble_keeps_both_active(register):
    register("cxr2d", "--activate")
    register(version="2")

    output = activate("tiny-cxr2d", "2", "--ensemble", "--weight", "0.5")

    active = dict(
        ModelVersion.objects.filter(status="active").values_list("version", "ensemble_weight")
    )
    assert active == {"1": 1.0, "2": 0.5}
    assert "Retired: none." in output


def test_activate_model_names_the_versions_it_knows(register):
    register()

    with pytest.raises(CommandError, match="versions of tiny-cxr2d: 1"):
        activate("tiny-cxr2d", "9")
    with pytest.raises(CommandError, match="must be positive"):
        activate("tiny-cxr2d", "1", "--weight", "0")

"""``manage.py train`` and ``evaluate`` end to end on tiny sets: every layout, both tasks.

Each run trains one epoch at a small input size; what is checked is what an ML engineer relies
on: the run folder, the TrainingRun row, and a registered candidate whose ONNX file gives the
torch network's outputs.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.management import CommandError, call_command

from inference import services
from inference.models import InferenceJob, ModelVersion, Prediction
from inference.pipeline import job_run
from inference.preprocessing import PreprocessSpec
from inference.runners import runner_for
from inference.torchvision_compat import import_torchvision
from studies import services as studies_services
from tests.factories import CT_SERIES, DATA, encode, make_dataset
from tests.training.test_datasets import write_csv
from training import run as training_run
from training.datasets import Sample, SampleDataset, load
from training.models import TrainingRun

pytestmark = pytest.mark.django_db
FULLRES = DATA / "cxr" / "kermany-val-fullres"
RUN_FILES = {
    "split.csv",
    "dataset.json",
    "epochs.csv",
    "epochs.jsonl",
    "last.pt",
    "best.pt",
    "learning_curves.png",
    "confusion_val.png",
    "confusion_test.png",
    "roc_pr.png",
    "report.txt",
    "metrics.json",
    "model.onnx",
    "model.pt",
    "model_card.json",
}


def train(*args: str, output: Path, **options: object) -> ModelVersion:
    call_command("train", *args, "--output", str(output), "--epochs", "1", **options)
    run = TrainingRun.objects.latest("pk")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error
    assert run.model_version is not None
    return run.model_version


def assert_onnx_matches_torch(model: ModelVersion, output: Path) -> None:
    """The registered ONNX and state_dict files give the same logits on the run's test part."""
    spec = PreprocessSpec.from_dict(model.preprocessing)
    data = SampleDataset(load_split(output, model), model.class_labels, spec)
    items = [data[i] for i in range(len(data))]
    batch = np.stack([item[0].numpy() for item in items])
    metadata = np.stack([item[1].numpy() for item in items]) if spec.metadata else None
    onnx = runner_for(model_version=model, kind="onnx").logits(batch, metadata)
    torch_logits = runner_for(model_version=model, kind="torch").logits(batch, metadata)
    assert onnx.shape == (len(data), len(model.class_labels))
    assert np.max(np.abs(onnx - torch_logits)) <= 1e-4


def load_split(output: Path, model: ModelVersion) -> list[Sample]:
    dataset = json.loads((output / "dataset.json").read_text())
    with (output / "split.csv").open() as handle:
        test_keys = {row["key"] for row in csv.DictReader(handle) if row["split"] == "test"}
    assert test_keys
    root = re.match(r"(?:folder per class|RSNA layout): ([^,]+)", dataset["source"])
    assert root is not None, dataset["source"]
    samples = load([Path(root[1])], task=model.task).samples
    return [s for s in samples if s.key in test_keys]


def test_cxr_folder_per_class_trains_registers_evaluates_and_resumes(tmp_path, capsys):
    output = tmp_path / "run"
    model = train(
        "cxr2d", str(FULLRES), "--architecture", "resnet10", "--size", "32", "--batch-size", "4",
        "--letterbox-aspect", "1.6", "--name", "smoke", "--version", "1", output=output,
    )  # fmt: skip

    assert {p.name for p in output.iterdir()} >= RUN_FILES
    assert model.status == ModelVersion.Status.CANDIDATE
    assert (model.task, model.architecture) == ("cxr2d", "resnet10")
    assert model.class_labels == ["NORMAL", "PNEUMONIA"]
    assert model.positive_label == "PNEUMONIA"
    assert PreprocessSpec.from_dict(model.preprocessing).size == (32, 32)
    card = json.loads((output / "model_card.json").read_text())
    assert "not for diagnostic use" in card["intended_use"]
    assert card["data"]["counts"]["test"] == {"NORMAL": 1, "PNEUMONIA": 1}
    assert card["files"]["onnx_sha256"] == model.onnx_sha256
    assert card["threshold"]["value"] == model.threshold
    for side in ("val", "test"):
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
            assert key in model.metrics[side]
    assert "PNEUMONIA" in (output / "report.txt").read_text()
    printed = capsys.readouterr().out
    assert "ONNX parity: max abs diff of logits" in printed
    assert "Registered smoke 1 (candidate)" in printed
    assert_onnx_matches_torch(model, output)

    call_command("evaluate", "smoke:1", str(FULLRES), "--output", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["evaluation"]
    assert metrics["n"] == 16
    assert metrics["threshold"] == model.threshold
    with (tmp_path / "eval" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16
    correct = sum(row["label"] == row["predicted"] for row in rows)
    assert metrics["accuracy"] == pytest.approx(correct / 16)

    call_command(
        "train", "cxr2d", str(FULLRES), "--architecture", "resnet10", "--size", "32",
        "--batch-size", "4", "--name", "smoke", "--version", "2", "--epochs", "2",
        "--resume", str(output / "last.pt"),
    )  # fmt: skip
    with (output / "epochs.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    assert TrainingRun.objects.latest("pk").epochs_done == 2


def test_rsna_layout_three_classes(tmp_path):
    images = tmp_path / "rsna" / "stage_2_train_images"
    images.mkdir(parents=True)
    classes = ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    labels, details = [], []
    for index in range(9):
        patient = f"patient{index}"
        make_dataset(rows=40, columns=48, Modality="CR").save_as(
            images / f"{patient}.dcm", enforce_file_format=True
        )
        label = classes[index % 3]
        labels.append([patient, "", "", "", "", str(int(label == "Lung Opacity"))])
        details.append([patient, label])
    write_csv(
        tmp_path / "rsna" / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        labels,
    )
    write_csv(
        tmp_path / "rsna" / "stage_2_detailed_class_info.csv", ["patientId", "class"], details
    )

    model = train(
        "cxr2d", str(tmp_path / "rsna"), "--architecture", "resnet10", "--size", "32",
        "--batch-size", "4", "--balance", "weights", output=tmp_path / "run",
    )  # fmt: skip

    assert model.class_labels == ["No Lung Opacity / Not Normal", "Normal", "Lung Opacity"]
    assert model.positive_label == "Lung Opacity"
    assert np.asarray(model.metrics["test"]["confusion"]).shape == (3, 3)


def test_metadata_fusion_trains_exports_two_inputs_and_runs_in_the_worker_pipeline(
    tmp_path, settings
):
    settings.INFERENCE_OUTPUT_DIR = tmp_path / "outputs"
    settings.INFERENCE_GRADCAM = "always"
    images = tmp_path / "rsna" / "stage_2_train_images"
    images.mkdir(parents=True)
    labels = []
    for index in range(8):
        make_dataset(
            rows=40, columns=48, Modality="CR", PatientAge=f"{30 + index:03d}Y",
            PatientSex="MF"[index % 2], ViewPosition=["PA", "AP"][index % 2],
        ).save_as(images / f"p{index}.dcm", enforce_file_format=True)  # fmt: skip
        labels.append([f"p{index}", "", "", "", "", str(index % 2)])
    header = ["patientId", "x", "y", "width", "height", "Target"]
    write_csv(tmp_path / "rsna" / "stage_2_train_labels.csv", header, labels)

    model = train(
        "cxr2d", str(tmp_path / "rsna"), "--architecture", "resnet10", "--size", "32",
        "--batch-size", "4", "--with-meta", "--freeze-epochs", "1", output=tmp_path / "run",
    )  # fmt: skip

    assert model.preprocessing["metadata"] is True
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert "PatientAge" in card["training"]["metadata_fusion"]
    assert_onnx_matches_torch(model, tmp_path / "run")
    with pytest.raises(ValueError, match="takes input, metadata"):
        runner_for(model_version=model, kind="onnx").logits(np.zeros((1, 1, 32, 32), np.float32))

    services.model_version_activate(model_version=model)
    ds = make_dataset(rows=40, columns=48, Modality="CR", PatientAge="040Y", PatientSex="F")
    instance = studies_services.instance_store(data=encode(ds), calling_ae="MODALITY")
    job = InferenceJob.objects.create(
        series=instance.series, series_revision=1, task="cxr2d", mode="per_series"
    )
    job_run(job_id=job.pk)
    prediction = Prediction.objects.get(job=job)
    assert prediction.status == "analysed", prediction.reason
    assert prediction.model_sha256 == model.onnx_sha256
    assert prediction.heatmap_path


def test_ct_registries_train_r3d_with_a_split_file(tmp_path):
    rows = []
    for index in range(6):
        folder = tmp_path / "ct" / f"study{index}"
        shutil.copytree(CT_SERIES, folder)
        rows.append(
            [f"study{index}", f"ct/study{index}", "folder", ["normal", "pathology"][index % 2]]
        )
    registry = write_csv(
        tmp_path / "registry.csv", ["study_key", "path", "path_type", "label"], rows
    )
    split = write_csv(
        tmp_path / "split.csv",
        ["key", "label", "split"],
        [
            [row[0], row[3], side]
            for row, side in zip(rows, ["train"] * 2 + ["val"] * 2 + ["test"] * 2, strict=True)
        ],
    )

    model = train(
        "ct3d", str(registry), "--size", "8,32,32", "--batch-size", "2", "--split-file", str(split),
        output=tmp_path / "run",
    )  # fmt: skip

    assert (model.task, model.architecture) == ("ct3d", "r3d_18")
    assert model.class_labels == ["normal", "pathology"]
    assert (tmp_path / "run" / "split.csv").read_text() == split.read_text()
    assert model.metrics["test"]["n"] == 2


def reviewed_radiograph(index: int, label: str, reviewer) -> None:
    instance = studies_services.instance_store(
        data=encode(make_dataset(rows=40, columns=40, Modality="CR", PatientID=f"P-{index}")),
        calling_ae="MODALITY",
    )
    job = InferenceJob.objects.create(
        series=instance.series, series_revision=1, task="cxr2d", mode="per_series"
    )
    prediction = Prediction.objects.create(
        job=job, series=instance.series, instance=instance, status="analysed", label="NORMAL",
        probabilities={"NORMAL": 0.6, "PNEUMONIA": 0.4}, probability=0.4, threshold=0.5,
        model_name="m", model_version="1", model_sha256="0" * 64,
    )  # fmt: skip
    verdict = "agree" if label == "NORMAL" else "disagree"
    services.review_create(prediction=prediction, reviewer=reviewer, verdict=verdict)


def test_radiologist_reviews_are_a_training_set(tmp_path, django_user_model):
    reviewer = django_user_model.objects.create_user(username="rad", password="x-long-password-1")
    for index in range(6):
        reviewed_radiograph(index, ["NORMAL", "PNEUMONIA"][index % 2], reviewer)

    model = train(
        "cxr2d", "--from-reviews", "--architecture", "resnet10", "--size", "32",
        "--batch-size", "4", output=tmp_path / "run",
    )  # fmt: skip

    data = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert data["source"] == "radiologist reviews (cxr2d)"
    assert sum(sum(part.values()) for part in data["counts"].values()) == 6
    assert model.class_labels == ["NORMAL", "PNEUMONIA"]


def test_an_export_that_differs_from_torch_is_not_registered(tmp_path, monkeypatch):
    monkeypatch.setattr(training_run, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(CommandError, match="differs from torch"):
        call_command(
            "train", "cxr2d", str(FULLRES), "--architecture", "resnet10", "--size", "32",
            "--epochs", "1", "--output", str(tmp_path / "run"),
        )  # fmt: skip
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.FAILED
    assert "differs from torch" in run.error
    assert not ModelVersion.objects.exists()


def test_bad_datasets_get_a_clear_error(tmp_path):
    with pytest.raises(CommandError, match="is not a folder"):
        call_command("train", "cxr2d", str(tmp_path / "missing"))
    with pytest.raises(CommandError, match="no dataset given"):
        call_command("train", "cxr2d")
    with pytest.raises(CommandError, match="positive class 'X'"):
        call_command("train", "cxr2d", str(FULLRES), "--positive", "X")
    with pytest.raises(CommandError, match="metadata fusion is for radiographs"):
        call_command("train", "ct3d", str(tmp_path), "--with-meta")
    with pytest.raises(CommandError, match="No model version"):
        call_command("evaluate", "nope:1", str(FULLRES))
    assert not TrainingRun.objects.exists()


def test_a_seeded_run_is_reproducible_and_pretrained_weights_stay_frozen_at_first(tmp_path):
    tv = import_torchvision()
    pretrained = tv.models.resnet18(weights=None).state_dict()  # 3 channels, 1000 classes
    torch.save(pretrained, tmp_path / "resnet18.pth")
    common = ["cxr2d", str(FULLRES), "--size", "32", "--batch-size", "4", "--no-register"]
    for name in ("a", "b"):
        call_command(
            "train", *common, "--epochs", "1", "--output", str(tmp_path / name),
            "--pretrained", str(tmp_path / "resnet18.pth"), "--freeze-epochs", "1",
        )  # fmt: skip

    first, second = (
        torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("a", "b")
    )
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert torch.equal(first["conv1.weight"], pretrained["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(first["layer4.1.conv2.weight"], pretrained["layer4.1.conv2.weight"])
    assert not torch.equal(first["fc.weight"][:2], pretrained["fc.weight"][:2])
    assert not ModelVersion.objects.exists()


def test_search_runs_optuna_trials_then_trains_the_best_and_logs_tensorboard(tmp_path, capsys):
    output = tmp_path / "run"
    model = train(
        "cxr2d", str(FULLRES), "--architecture", "resnet10", "--size", "32", "--search", "2",
        "--name", "searched", "--version", "1", output=output,
    )  # fmt: skip

    with (output / "search.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert [row["trial"] for row in trials] == ["0", "1"]
    best = max(trials, key=lambda row: float(row["val_roc_auc"]))
    config = json.loads((output / "model_card.json").read_text())["training"]["config"]
    assert config["lr"] == pytest.approx(float(best["lr"]))
    assert config["batch_size"] == int(best["batch_size"])
    for trial in ("000", "001"):
        assert (output / "trials" / trial / "split.csv").read_text() == (
            output / "split.csv"
        ).read_text()
    assert ModelVersion.objects.get() == model  # trials are not registered
    assert TrainingRun.objects.count() == 3
    assert "Search: 2 trials" in capsys.readouterr().out
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))

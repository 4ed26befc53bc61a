"""Tiny real models, built and exported to ONNX inside the tests: no test needs a shipped model."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path

import pytest
import torch

from inference import services
from inference.models import ModelVersion, RoutingRule
from inference.networks import build_model, export_onnx
from inference.preprocessing import PreprocessSpec

SPECS = {
    "cxr2d": PreprocessSpec(dims=2, size=(64, 64), modalities=("CR", "DX"), mean=0.5, std=0.25),
    "ct3d": PreprocessSpec(
        dims=3, size=(16, 32, 32), window=(-600.0, 1500.0), modalities=("CT",), min_slices=20
    ),
}
LABELS = {"cxr2d": ["NORMAL", "PNEUMONIA"], "ct3d": ["normal", "pathology"]}


def make_model_files(task: str, folder: Path, seed: int = 0) -> tuple[Path, Path, str]:
    """A random-weight network for ``task``: its ONNX file, state_dict file and architecture."""
    torch.manual_seed(seed)
    architecture = "r3d_18" if task == "ct3d" else "resnet18"
    model = build_model(architecture, num_classes=2).eval()
    example = torch.randn(1, 1, *SPECS[task].size)
    onnx_path, weights_path = folder / f"{task}-{seed}.onnx", folder / f"{task}-{seed}.pt"
    export_onnx(model, example, onnx_path)
    torch.save(model.state_dict(), weights_path)
    return onnx_path, weights_path, architecture


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    folder = tmp_path_factory.mktemp("models")
    return {task: make_model_files(task, folder) for task in SPECS}


@pytest.fixture
def register_model(model_files) -> Callable[..., ModelVersion]:
    def register(task: str, *, activate: bool = True, threshold: float = 0.5, version: str = "1"):
        onnx_path, weights_path, architecture = model_files[task]
        model = services.model_version_register(
            name=f"tiny-{task}",
            version=version,
            task=task,
            architecture=architecture,
            class_labels=LABELS[task],
            positive_label=LABELS[task][1],
            threshold=threshold,
            preprocessing=SPECS[task].to_dict(),
            onnx_file=onnx_path,
            weights_file=weights_path,
        )
        return services.model_version_activate(model_version=model) if activate else model

    return register


@pytest.fixture
def default_routing(transactional_db: None) -> None:
    """Chest radiographs and chest CTs are routed to their models, as on a fresh installation
    (a transactional test's flush deletes what the migrations put in the database)."""
    defaults = import_module("inference.migrations.0002_default_routing_rules").DEFAULTS
    for fields in defaults:
        RoutingRule.objects.get_or_create(name=fields["name"], defaults=fields)

"""Lazy registry of runners: a model is loaded on first use and cached per worker process.

Runner modules import onnxruntime or torch; nothing here does, so the web process and the DICOM
listener can import the inference app without loading either.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np
from django.conf import settings
from django.utils.module_loading import import_string

from inference.models import ModelVersion

RUNNERS = {
    "onnx": "inference.runners.onnx.OnnxRunner",
    "torch": "inference.runners.torch.TorchRunner",
}


class ModelIntegrityError(RuntimeError):
    """A model file is missing or its sha256 differs from the registry's."""


class Runner(Protocol):
    def __init__(self, model_version: ModelVersion) -> None: ...

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        """Logits [N, classes] for a float32 batch [N, 1, H, W] or [N, 1, D, H, W]; a model
        with metadata fusion also needs ``metadata`` [N, features]."""
        ...


_cache: dict[tuple[str, str], Runner] = {}
_lock = threading.Lock()


def runner_for(*, model_version: ModelVersion, kind: str = "onnx") -> Runner:
    """The runner of ``kind`` for a model version, loaded once per process (keyed by sha256)."""
    sha = model_version.onnx_sha256 if kind == "onnx" else model_version.weights_sha256
    key = (kind, sha)
    with _lock:
        if key not in _cache:
            runner_class: type[Runner] = import_string(RUNNERS[kind])
            _cache[key] = runner_class(model_version)
        return _cache[key]


def verified_path(relative: str, sha256: str) -> Path:
    """The model file's path, after checking that its content is the registered one."""
    from inference.services import sha256_of

    path = Path(settings.INFERENCE_MODELS_DIR) / relative
    if not path.is_file():
        raise ModelIntegrityError(f"model file {relative} is missing")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelIntegrityError(
            f"model file {relative} has sha256 {actual[:12]}…, the registry says {sha256[:12]}…"
        )
    return path

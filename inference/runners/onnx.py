"""ONNX Runtime: the CUDA provider where the GPU build and a GPU are present, else the CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from django.conf import settings

from inference.models import ModelVersion
from inference.runners import verified_path


def providers() -> list[str]:
    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [provider for provider in preferred if provider in available]


class OnnxRunner:
    def __init__(self, model_version: ModelVersion) -> None:
        path = verified_path(model_version.onnx_path, model_version.onnx_sha256)
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.ORT_INTRA_OP_THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers())
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return np.asarray(outputs[0], dtype=np.float32)

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
        self.input_names = [node.name for node in self.session.get_inputs()]

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        arrays = [batch] if metadata is None else [batch, metadata]
        if len(arrays) != len(self.input_names):
            raise ValueError(f"the model takes {', '.join(self.input_names)}")
        feeds = {
            name: np.ascontiguousarray(array, np.float32)
            for name, array in zip(self.input_names, arrays, strict=True)
        }
        outputs = self.session.run(None, feeds)
        return np.asarray(outputs[0], dtype=np.float32)

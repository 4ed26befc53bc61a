"""PyTorch: the network itself, for Grad-CAM and as a fallback when ONNX Runtime cannot run."""

from __future__ import annotations

import numpy as np
import torch

from inference.models import ModelVersion
from inference.networks import build_model
from inference.runners import verified_path


class TorchRunner:
    def __init__(self, model_version: ModelVersion) -> None:
        path = verified_path(model_version.weights_path, model_version.weights_sha256)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(
            model_version.architecture,
            len(model_version.class_labels),
            metadata=bool(model_version.preprocessing.get("metadata")),
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval().to(self.device)

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        arrays = [batch] if metadata is None else [batch, metadata]
        with torch.inference_mode():
            output = self.model(
                *(
                    torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(self.device)
                    for array in arrays
                )
            )
        return np.asarray(output.float().cpu().numpy(), np.float32)

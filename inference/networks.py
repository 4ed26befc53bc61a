"""The network definitions that training builds and inference runs, plus their ONNX export.

One place defines each architecture, so a checkpoint trained by ``manage.py train`` always loads
into the same module the worker builds. Every network reads one grey channel:

- ``resnet10``, ``resnet18``, ``resnet50``: radiographs, input ``[N, 1, H, W]``; ResNet-10 is
  torchvision's ResNet with one basic block per stage (half ResNet-18's compute, 4.9M
  parameters): the shipped chest X-ray model, small enough to keep in the repository;
- ``r3d_18``: CT volumes, input ``[N, 1, D, H, W]``;

and returns logits ``[N, num_classes]``. Weights start random (``weights=None``): nothing is
downloaded, training or a stored checkpoint provides them.

Workers and training only: importing this module imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.preprocessing import METADATA_FEATURES
from inference.torchvision_compat import import_torchvision

ARCHITECTURES_2D = ("resnet10", "resnet18", "resnet50")
ARCHITECTURES_3D = ("r3d_18",)
ONNX_OPSET = 18
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
ONNX_METADATA = "metadata"
METADATA_WIDTH = 16


def input_dims(architecture: str) -> int:
    """2 for the radiograph networks, 3 for the CT network; ValueError for an unknown name."""
    if architecture in ARCHITECTURES_2D:
        return 2
    if architecture in ARCHITECTURES_3D:
        return 3
    known = ", ".join(ARCHITECTURES_2D + ARCHITECTURES_3D)
    raise ValueError(f"unknown architecture {architecture!r}; known: {known}")


class MetadataFusion(nn.Module):
    """A 2D network whose head also reads DICOM metadata (``manage.py train --with-meta``).

    The backbone's pooled image features and a small embedding of the metadata vector
    (:data:`inference.preprocessing.METADATA_FEATURES`) are concatenated and go through one
    linear layer. Called as ``model(image, metadata)``; ONNX inputs ``"input"`` and
    ``"metadata"``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, features: int) -> None:
        super().__init__()
        fc = backbone.get_submodule("fc")
        assert isinstance(fc, nn.Linear)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.metadata = nn.Sequential(nn.Linear(features, METADATA_WIDTH), nn.ReLU())
        self.fc = nn.Linear(fc.in_features + METADATA_WIDTH, num_classes)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.backbone(image), self.metadata(metadata)], dim=1)
        logits: torch.Tensor = self.fc(features)
        return logits


def build_model(architecture: str, num_classes: int, *, metadata: bool = False) -> nn.Module:
    """A randomly initialised network with a one-channel stem and ``num_classes`` logits;
    with ``metadata``, wrapped in :class:`MetadataFusion` (radiograph networks only)."""
    if metadata:
        if input_dims(architecture) != 2:
            raise ValueError("metadata fusion is for radiograph networks only")
        backbone = build_model(architecture, num_classes)
        return MetadataFusion(backbone, num_classes, len(METADATA_FEATURES))
    models = import_torchvision().models
    model: nn.Module
    if input_dims(architecture) == 2:
        if architecture == "resnet10":
            resnet = models.resnet
            model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        else:
            model = getattr(models, architecture)(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        model = models.video.r3d_18(weights=None, num_classes=num_classes)
        stem = model.get_submodule("stem")
        assert isinstance(stem, nn.Sequential)
        # Same geometry as torchvision's BasicStem, one input channel instead of three.
        stem[0] = nn.Conv3d(
            1, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )
    return model


def target_layer(model: nn.Module, architecture: str) -> nn.Module:
    """The layer Grad-CAM reads: the last residual block, the deepest map with spatial extent.

    The same for the three networks (``layer4[-1]``); the architecture is checked so that a
    future network with another layout fails here rather than explaining the wrong layer.
    """
    input_dims(architecture)
    network = model.backbone if isinstance(model, MetadataFusion) else model
    return list(network.get_submodule("layer4").children())[-1]


def per_slice_logits(
    model: nn.Module, volume: torch.Tensor, *, architecture: str, num_slices: int
) -> torch.Tensor:
    """Logits for each of ``num_slices`` slices spread evenly over ``volume``'s depth.

    Class activation mapping along the depth axis (Zhou et al., CVPR 2016): r3d_18 ends in a
    global average pool followed by the linear ``fc``, so the volume's logits are exactly the
    mean over the final feature map's depth of ``fc`` applied to each depth position (averaged
    over height and width). Those per-position logits are each slab's share of the decision.
    The final map has depth ``D / 8``; its logits are linearly interpolated (cell-centre
    aligned, as the volume resampling is) to ``num_slices``, normally the number of slices of
    the original series in sorted order. One forward pass, no gradients: as cheap as the
    volume's own prediction. Localisation is as coarse as the map (a slab of 8 resampled
    slices, with overlapping receptive fields). Apply the activation used for the volume
    (softmax or sigmoid) to get a probability per slice. Put the model in eval mode first, as
    for any prediction (batch norm).

    The volume is moved to the model's device; the result comes back on the volume's.
    Returns ``[N, num_slices, num_classes]``.
    """
    if input_dims(architecture) != 3:
        raise ValueError(f"per-slice logits need a 3D network, not {architecture!r}")
    device = next(model.parameters()).device
    with torch.no_grad():
        features = volume.to(device)
        for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
            features = model.get_submodule(name)(features)
        per_depth = model.get_submodule("fc")(features.mean(dim=(3, 4)).transpose(1, 2))
        resampled = nn.functional.interpolate(
            per_depth.transpose(1, 2), size=num_slices, mode="linear", align_corners=False
        )
    return resampled.transpose(1, 2).to(volume.device)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: Path,
    *,
    metadata: torch.Tensor | None = None,
) -> None:
    """Write ``model`` in eval mode to ``path`` as one self-contained ONNX file.

    Input ``"input"`` (and ``"metadata"`` for a :class:`MetadataFusion` model, with an
    example ``metadata``) and output ``"logits"``; the batch axis is dynamic, every other axis
    (including a CT volume's depth) stays as in ``example_input``. Uses torch's dynamo exporter
    (``torch.export``, opset 18, needs the ``onnx`` and ``onnxscript`` packages, no network).
    The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    inputs = (example_input,) if metadata is None else (example_input, metadata)
    try:
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT, ONNX_METADATA][: len(inputs)],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=tuple({0: batch} for _ in inputs),
            external_data=False,
            verbose=False,
        )
    finally:
        model.train(was_training)


def onnx_max_abs_diff(
    model: nn.Module,
    path: Path,
    example_input: torch.Tensor,
    *,
    metadata: torch.Tensor | None = None,
) -> float:
    """The largest absolute difference between ONNX Runtime (CPU) and torch logits on one input.

    Both run in inference mode on ``example_input``; the model's training mode is restored.
    Training calls this after :func:`export_onnx` and refuses an export above its tolerance.
    """
    import onnxruntime  # type: ignore[import-untyped, unused-ignore]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {ONNX_INPUT: example_input.numpy()}
    inputs = [example_input]
    if metadata is not None:
        feeds[ONNX_METADATA] = metadata.numpy()
        inputs.append(metadata)
    (onnx_logits,) = session.run([ONNX_OUTPUT], feeds)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_logits = model(*inputs).numpy()
    finally:
        model.train(was_training)
    return float(np.max(np.abs(np.asarray(onnx_logits) - torch_logits)))

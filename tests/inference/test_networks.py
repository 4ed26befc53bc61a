"""The shared network definitions: shapes, Grad-CAM layers, per-slice logits, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.networks import (
    build_model,
    export_onnx,
    input_dims,
    onnx_max_abs_diff,
    per_slice_logits,
    target_layer,
)
from inference.torchvision_compat import import_torchvision

SMALL_INPUTS = {
    "resnet18": (2, 1, 64, 64),
    "resnet50": (2, 1, 64, 64),
    "r3d_18": (2, 1, 16, 32, 32),
}


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("architecture", sorted(SMALL_INPUTS))
def test_each_network_reads_one_channel_and_returns_one_logit_per_class(architecture: str) -> None:
    model = build_model(architecture, num_classes=3).eval()

    with torch.no_grad():
        logits = model(torch.randn(SMALL_INPUTS[architecture]))

    assert logits.shape == (2, 3)
    batch, _, *extent = SMALL_INPUTS[architecture]
    with pytest.raises(RuntimeError, match="channels"):
        model(torch.randn(batch, 3, *extent))


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="densenet121"):
        build_model("densenet121", num_classes=2)


@pytest.mark.parametrize("architecture", ["resnet18", "r3d_18"])
def test_grad_cam_on_the_target_layer_gives_a_map_over_the_whole_input(architecture: str) -> None:
    import_torchvision()
    from pytorch_grad_cam import GradCAM  # type: ignore[import-untyped, unused-ignore]
    from pytorch_grad_cam.utils.model_targets import (  # type: ignore[import-untyped, unused-ignore]
        ClassifierOutputTarget,
    )

    model = build_model(architecture, num_classes=2).eval()
    image = torch.randn((1, *SMALL_INPUTS[architecture][1:]))

    with GradCAM(model=model, target_layers=[target_layer(model, architecture)]) as cam:
        heatmap = cam(input_tensor=image, targets=[ClassifierOutputTarget(1)])

    assert heatmap.shape == (1, *image.shape[2:])
    assert 0 <= heatmap.min() <= heatmap.max() <= 1


def test_per_slice_logits_average_to_the_volume_logits() -> None:
    model = build_model("r3d_18", num_classes=2).eval()
    volume = torch.randn(2, 1, 16, 32, 32)

    with torch.no_grad():
        logits = model(volume)
        # Depth 16 leaves 2 positions in the last feature map: one logit pair per slab.
        per_slab = per_slice_logits(model, volume, architecture="r3d_18", num_slices=2)
        per_slice = per_slice_logits(model, volume, architecture="r3d_18", num_slices=30)

    torch.testing.assert_close(per_slab.mean(dim=1), logits, rtol=0, atol=1e-5)
    assert per_slice.shape == (2, 30, 2)
    # The first and last slices lie in different slabs and take those slabs' logits.
    torch.testing.assert_close(per_slice[:, 0], per_slab[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(per_slice[:, -1], per_slab[:, -1], rtol=0, atol=1e-5)


def test_per_slice_logits_need_a_3d_network() -> None:
    model = build_model("resnet18", num_classes=2)

    with pytest.raises(ValueError, match="3D"):
        per_slice_logits(model, torch.randn(1, 1, 64, 64), architecture="resnet18", num_slices=4)


@pytest.mark.parametrize(
    ("architecture", "example", "batch"),
    [
        ("resnet18", (1, 1, 64, 64), (3, 1, 64, 64)),
        ("r3d_18", (1, 1, 16, 32, 32), (3, 1, 16, 32, 32)),
    ],
)
def test_onnx_export_matches_torch_for_any_batch_size(
    architecture: str, example: tuple[int, ...], batch: tuple[int, ...], tmp_path: Path
) -> None:
    model = build_model(architecture, num_classes=2)
    path = tmp_path / f"{architecture}.onnx"

    export_onnx(model, torch.randn(example), path)

    assert model.training, "the caller's training mode is restored"
    assert input_dims(architecture) == len(example) - 2
    assert onnx_max_abs_diff(model, path, torch.randn(batch)) < 1e-4

"""Grad-CAM heatmaps (pytorch-grad-cam), their overlays, and boxes derived from them.

2D: one heatmap per image. 3D: a heatmap volume, shown as overlays on the most salient axial
slices and a montage. Boxes are the connected regions of the heatmap above a threshold, tiny
ones dropped, each with its peak value as score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from scipy import ndimage

from inference.networks import target_layer
from inference.torchvision_compat import import_torchvision

Array = npt.NDArray[np.float32]


class _WithMetadata(torch.nn.Module):
    """A metadata-fusion network with its metadata bound: Grad-CAM varies the image only."""

    def __init__(self, model: torch.nn.Module, metadata: torch.Tensor) -> None:
        super().__init__()
        self.model, self.metadata = model, metadata

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(image, self.metadata)
        return logits


def gradcam(
    model: torch.nn.Module,
    architecture: str,
    batch: Array,
    class_index: int,
    metadata: Array | None = None,
) -> Array:
    """Heatmaps in [0, 1] at the input's size: [N, H, W] for 2D input, [N, D, H, W] for 3D.

    A metadata-fusion model needs the batch's ``metadata`` too.
    """
    import_torchvision()  # pytorch_grad_cam imports torchvision, which needs the CPU shim here
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    tensor = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(device)
    layer = target_layer(model, architecture)
    if metadata is not None:
        model = _WithMetadata(model, torch.from_numpy(metadata).to(device))
    with GradCAM(model=model, target_layers=[layer]) as cam:
        heat = cam(input_tensor=tensor, targets=[ClassifierOutputTarget(class_index)] * len(batch))
    return np.nan_to_num(np.asarray(heat, np.float32))


def boxes(heat: Array, *, threshold: float = 0.5, min_area: float = 0.005) -> list[dict[str, Any]]:
    """Boxes around the regions where a 2D heatmap is at least ``threshold``.

    Regions smaller than ``min_area`` (a fraction of the image) are dropped. Coordinates are in
    heatmap pixels: ``x``, ``y`` of the top-left corner, ``width``, ``height``; ``score`` is the
    region's peak.
    """
    labels, _ = ndimage.label(heat >= threshold)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        rows, columns = region
        mask = labels[region] == index
        if mask.sum() < min_area * heat.size:
            continue
        found.append(
            {
                "x": int(columns.start),
                "y": int(rows.start),
                "width": int(columns.stop - columns.start),
                "height": int(rows.stop - rows.start),
                "score": round(float(heat[region][mask].max()), 4),
            }
        )
    return sorted(found, key=lambda box: -box["score"])


def overlay(image: Array, heat: Array, *, alpha: float = 0.4) -> npt.NDArray[np.uint8]:
    """An RGB picture of a [0, 1] greyscale image with the heatmap in a jet colour map."""
    grey = np.clip(image, 0.0, 1.0)[..., None]
    colour = _jet(np.clip(heat, 0.0, 1.0))
    blended = (1 - alpha) * grey + alpha * colour
    return np.asarray(np.round(blended * 255), np.uint8)


def save_png(rgb: npt.NDArray[np.uint8], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    Image.fromarray(rgb).save(tmp, format="PNG")
    tmp.replace(path)


def salient_slices(heat: Array, count: int) -> list[int]:
    """Indices of the ``count`` axial slices of a [D, H, W] heatmap with the most activation."""
    strength = heat.reshape(heat.shape[0], -1).mean(axis=1)
    return sorted(int(i) for i in np.argsort(strength)[::-1][:count])


def montage(tiles: list[npt.NDArray[np.uint8]], *, columns: int = 4) -> npt.NDArray[np.uint8]:
    """Tiles of equal size in a grid, row by row, black where the grid is not full."""
    height, width, channels = tiles[0].shape
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = tile
    return grid


def _jet(values: Array) -> Array:
    """The classic jet colour map: blue (0) through green to red (1)."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1).astype(np.float32)

"""CT series to model input, and the series-level quality gate.

Slices sorted along the slice normal, HU windowed to [0, 1], area-averaged where the model size
is smaller and trilinear where it is larger, flipped to the standard axial orientation, then
normalised: float32 ``[1, D, H, W]``. torch is imported only inside the resampling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from pydicom import Dataset
from pydicom.pixels.utils import pixel_array

from inference.preprocessing.header import check_instance
from inference.preprocessing.spec import (
    Array,
    NotAnalysable,
    PreprocessSpec,
    dicom_header,
    require_dims,
    require_pixels,
)

SliceSource: TypeAlias = Dataset | str | os.PathLike[str]

# Rows must run along the patient's x axis and columns along y within 30 degrees: axial slices,
# gantry tilt allowed, sagittal/coronal and transposed in-plane layouts refused.
_AXIAL_MIN_COSINE = math.cos(math.radians(30))
_ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CtVolume:
    """A CT series as model input.

    ``pixels`` is ``[1, D, H, W]``; depth runs feet to head, rows anterior to posterior, columns
    patient right to left. ``slice_uids`` are the original slices' SOP Instance UIDs in that
    same depth order (per-slice results map onto them); ``spacing_mm`` is their spacing.
    """

    pixels: Array
    slice_uids: tuple[str, ...]
    spacing_mm: float


class VolumeBuffer:
    """Scratch memory for decoded slices, reused from one series to the next.

    A 300-slice 512x512 series needs 300 MB of float32; allocating that afresh for every series
    costs more than decoding it on these hosts, so a worker keeps one buffer per process.
    """

    def __init__(self) -> None:
        self._flat: Array = np.empty(0, np.float32)

    def take(self, shape: tuple[int, ...]) -> Array:
        """An uninitialised float32 array of ``shape``, valid until the next call."""
        size = math.prod(shape)
        if self._flat.size < size:
            self._flat = np.empty(size, np.float32)
        return self._flat[:size].reshape(shape)


@dataclass(frozen=True)
class _Geometry:
    order: tuple[int, ...]
    spacing_mm: float
    flip_rows: bool
    flip_columns: bool


def ct_volume(
    sources: Sequence[SliceSource], spec: PreprocessSpec, *, buffer: VolumeBuffer | None = None
) -> CtVolume:
    """The model input for one CT series given as datasets or file paths, in any order.

    Raises :class:`NotAnalysable` when the slices do not form one regular axial stack. Each
    slice is decoded straight into ``buffer`` (one float32 volume at source resolution), so
    peak memory is that volume plus one slice; pass a worker's buffer to reuse it. Paths keep
    memory lowest: a slice's pixel data is read, decoded and dropped, while datasets keep
    theirs for as long as the caller holds them.
    """
    require_dims(spec, 3)
    assert spec.window is not None
    headers = [_header(source) for source in sources]
    geometry = _series_geometry(headers, spec)
    first = headers[0]
    volume = (buffer or VolumeBuffer()).take((len(headers), int(first.Rows), int(first.Columns)))
    low, high = spec.window
    for slot, index in enumerate(geometry.order):
        header = headers[index]
        require_pixels(header)
        source = sources[index]
        target = volume[slot]
        target[...] = pixel_array(source if isinstance(source, Dataset) else os.fspath(source))
        # CT stores Hounsfield units through rescale slope and intercept, never a LUT.
        target *= np.float32(header.get("RescaleSlope", 1) or 1)
        target += np.float32(header.get("RescaleIntercept", 0) or 0)
        np.clip(target, low, high, out=target)
        target -= np.float32(low)
        target /= np.float32(high - low)
    resampled = _resample(volume, (spec.size[0], spec.size[1], spec.size[2]))
    if geometry.flip_rows:
        resampled = resampled[:, ::-1, :]
    if geometry.flip_columns:
        resampled = resampled[:, :, ::-1]
    pixels = np.empty((1, *spec.size), np.float32)
    np.subtract(resampled, np.float32(spec.mean), out=pixels[0])
    pixels /= np.float32(spec.std)
    uids = tuple(str(headers[index].get("SOPInstanceUID", "")) for index in geometry.order)
    return CtVolume(pixels=pixels, slice_uids=uids, spacing_mm=geometry.spacing_mm)


def _resample(volume: Array, size: tuple[int, int, int]) -> Array:
    """Area-average the axes that shrink (antialiasing), then trilinear on those that grow."""
    import torch

    tensor = torch.from_numpy(volume)[None, None]
    reduced = tuple(min(have, want) for have, want in zip(volume.shape, size, strict=True))
    with torch.no_grad():
        if reduced != volume.shape:
            tensor = torch.nn.functional.adaptive_avg_pool3d(tensor, reduced)
        if reduced != size:
            tensor = torch.nn.functional.interpolate(
                tensor, size=size, mode="trilinear", align_corners=False
            )
    return tensor[0, 0].numpy()


def _header(source: SliceSource) -> Dataset:
    if isinstance(source, Dataset):
        return source
    return dicom_header(source)


def _series_geometry(headers: Sequence[Dataset], spec: PreprocessSpec) -> _Geometry:
    """Sort by position along the slice normal and check the stack is regular and axial."""
    _require_slice_count(len(headers), spec)
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, ValueError, TypeError) as error:
        raise NotAnalysable(
            "Slice position or orientation is missing: the slices cannot be stacked.",
            code="geometry",
        ) from error
    if orientations.shape[1] != 6 or positions.shape[1] != 3:
        raise NotAnalysable("Slice position or orientation is malformed.", code="geometry")
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise NotAnalysable(
            "The slices have different orientations: the series mixes planes.",
            code="orientation",
        )
    row, column = orientations[0, :3], orientations[0, 3:]
    if abs(row[0]) < _AXIAL_MIN_COSINE or abs(column[1]) < _AXIAL_MIN_COSINE:
        raise NotAnalysable(
            "Not an axial series (sagittal, coronal or oblique reformat).", code="not_axial"
        )
    matrices = {
        (int(h.Rows), int(h.Columns), tuple(float(v) for v in h.get("PixelSpacing", []) or []))
        for h in headers
    }
    if len(matrices) != 1:
        raise NotAnalysable(
            "The slices differ in matrix size or pixel spacing: the series mixes reconstructions.",
            code="geometry",
        )
    along_normal = positions @ np.cross(row, column)
    order = np.argsort(along_normal, kind="stable")
    gaps = np.diff(along_normal[order])
    spacing = float(np.median(gaps))
    if gaps.min() < spec.spacing_tolerance_mm:
        raise NotAnalysable(
            "Two or more slices share a position: the series mixes acquisitions or phases.",
            code="spacing",
        )
    if np.abs(gaps - spacing).max() > spec.spacing_tolerance_mm:
        raise NotAnalysable(
            f"Slice spacing is not uniform ({gaps.min():.2f} to {gaps.max():.2f} mm): "
            "slices are missing or the series mixes reconstructions.",
            code="spacing",
        )
    return _Geometry(
        order=tuple(int(i) for i in order),
        spacing_mm=spacing,
        flip_rows=bool(column[1] < 0),
        flip_columns=bool(row[0] < 0),
    )


def check_ct_series(sources: Sequence[SliceSource], spec: PreprocessSpec) -> None:
    """Raise :class:`NotAnalysable` unless the series is one this CT model may read.

    Reads headers only (paths are read without their pixel data).
    """
    require_dims(spec, 3)
    headers = [_header(source) for source in sources]
    # Before the per-image checks: a scout or a short series is the common, plainer reason.
    _require_slice_count(len(headers), spec)
    for header in headers:
        check_instance(header, spec)
    _series_geometry(headers, spec)


def _require_slice_count(count: int, spec: PreprocessSpec) -> None:
    if count < spec.min_slices:
        raise NotAnalysable(
            f"Only {count} slices; at least {spec.min_slices} are needed for a CT volume.",
            code="too_few_slices",
        )

"""Pixels to model input, and the quality gate before any model: shared by training and inference.

A model sees in production exactly the pixels it saw in training because both call these
functions with the :class:`PreprocessSpec` stored (as JSON) with the model version.

- Radiographs (CR/DX DICOM in any transfer syntax pydicom can decode, or JPEG/PNG) become
  float32 ``[1, H, W]``: modality LUT (rescale), then the VOI (the spec's window, else the
  file's VOI LUT, else its window, else the image's own range) to [0, 1], MONOCHROME1 inverted,
  long side resized to the model size with the aspect ratio kept (antialiased), the rest padded
  with black, then ``(x - mean) / std``.
- CT series become float32 ``[1, D, H, W]``: slices sorted along the slice normal, HU windowed
  to [0, 1], area-averaged where the model size is smaller and trilinear where it is larger,
  flipped to the standard axial orientation, then normalised.
- :func:`check_radiograph` and :func:`check_ct_series` raise :class:`NotAnalysable` with a
  reason a radiologist understands when a model should not see the images at all.

Pure functions over pydicom datasets, paths and numpy arrays; torch is imported only inside the
CT resampling, so importing this module costs numpy, Pillow and pydicom only.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

Array: TypeAlias = npt.NDArray[np.float32]
SliceSource: TypeAlias = Dataset | str | os.PathLike[str]

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
RADIOGRAPH_MODALITIES = ("CR", "DX")

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

# Rows must run along the patient's x axis and columns along y within 30 degrees: axial slices,
# gantry tilt allowed, sagittal/coronal and transposed in-plane layouts refused.
_AXIAL_MIN_COSINE = math.cos(math.radians(30))
_ORIENTATION_TOLERANCE = 1e-3
# Headers are read with large values (pixel data) left on disk until decoded.
_HEADER_DEFER_SIZE = "64 KB"


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model's input is made and which images it accepts; stored with its ModelVersion.

    ``dims`` 2 (radiograph, ``size`` = (H, W)) or 3 (CT, ``size`` = (D, H, W)). ``window`` is
    (low, high) in modality units: Hounsfield units for CT, where it is required; for DICOM
    radiographs it replaces the file's own VOI, and it does not apply to JPEG/PNG, whose pixels
    are already display values. ``modalities`` and ``body_parts`` empty mean any. Ages are in
    years; an unknown age is accepted.
    """

    dims: int
    size: tuple[int, ...]
    window: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = 1.0
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = CHEST_BODY_PARTS
    min_slices: int = 20
    spacing_tolerance_mm: float = 0.1
    min_age_years: float | None = None
    max_age_years: float | None = None
    # The network also reads METADATA_FEATURES (trained with ``manage.py train --with-meta``).
    metadata: bool = False

    def __post_init__(self) -> None:
        if self.dims not in (2, 3) or len(self.size) != self.dims or min(self.size) < 1:
            raise ValueError(f"size {self.size} does not fit {self.dims} dimensions")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window {self.window} is empty")
        if self.dims == 3 and self.window is None:
            raise ValueError("a CT spec needs an HU window")
        if not self.std > 0:
            raise ValueError("std must be positive")
        if self.metadata and self.dims != 2:
            raise ValueError("metadata fusion is for radiographs (2 dimensions) only")
        if self.min_slices < 2:
            raise ValueError("min_slices must be at least 2 to measure the slice spacing")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` turns back into an equal spec."""
        return {
            item.name: list(value) if isinstance(value, tuple) else value
            for item in fields(self)
            for value in [getattr(self, item.name)]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """The spec stored by :meth:`to_dict`; absent keys take their defaults.

        An unknown key raises ValueError: a stored spec this code cannot honour must not run
        silently with part of it ignored.
        """
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {', '.join(unknown)}")
        values: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
        }
        return cls(**values)


CHEST_XRAY = PreprocessSpec(dims=2, size=(224, 224), modalities=RADIOGRAPH_MODALITIES)
CHEST_CT = PreprocessSpec(dims=3, size=(96, 192, 192), window=(-600.0, 1500.0), modalities=("CT",))


class NotAnalysable(Exception):
    """The images must not be given to the model. ``reason`` is written for the radiologist;
    ``code`` is a short stable identifier for reports and statistics."""

    def __init__(self, reason: str, *, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# --- radiographs -------------------------------------------------------------------------------


def radiograph_from_dataset(ds: Dataset, spec: PreprocessSpec) -> Array:
    """The model input ``[1, H, W]`` for a single-frame greyscale DICOM image.

    A dataset read with :func:`dicom_header` (pixel data left on disk) is read fastest.
    """
    _require_dims(spec, 2)
    _require_pixels(ds)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotAnalysable("Colour image: not a radiograph.", code="colour")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise NotAnalysable("Multi-frame image: not a single radiograph.", code="multi_frame")
    # MONOCHROME1 shows its lowest value white: invert after the VOI, as a viewer does.
    invert = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    stored = _stored_pixels(ds)
    window = _stored_window(stored, ds, spec.window)
    if window is not None:
        # The VOI is a clip at whole stored values: clip the integers in place, and leave the
        # rest of the (affine) mapping to the resized image.
        low, high, clip = window
        if clip:
            info = np.iinfo(stored.dtype)
            bounds = np.clip([low, high], info.min, info.max).astype(stored.dtype)
            np.clip(stored, bounds[0], bounds[1], out=stored)
        peak = min(high, int(np.iinfo(stored.dtype).max))
        return _fit(stored, spec, offset=low, scale=1.0 / (high - low), invert=invert, peak=peak)
    values, scale = _display_values(apply_modality_lut(stored, ds), ds, spec.window)
    return _fit(values, spec, scale=scale, invert=invert)


def dicom_header(path: str | os.PathLike[str]) -> Dataset:
    """A DICOM file's data set with its large values (pixel data) left on disk until used."""
    return dcmread(path, defer_size=_HEADER_DEFER_SIZE)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file is DICOM Part 10 ("DICM" after the 128-byte preamble)."""
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def radiograph_from_file(path: str | os.PathLike[str], spec: PreprocessSpec) -> Array:
    """The model input ``[1, H, W]`` for a DICOM file (told by its content) or a Pillow image."""
    _require_dims(spec, 2)
    if is_dicom_file(path):
        return radiograph_from_dataset(dicom_header(path), spec)
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I"):
            # 16-bit greyscale PNG/TIFF.
            unit = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        else:
            unit = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return _fit(unit, spec)


_NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def _stored_pixels(ds: Dataset) -> npt.NDArray[Any]:
    """The stored values of a single-frame greyscale image, as a writable array.

    Uncompressed pixel data still on disk (a header read by :func:`dicom_header`) is read
    straight into this thread's buffer, valid until its next radiograph: a 2048x2048 image is
    8 MB, and a fresh array of that size costs thousands of page faults on these hosts, more
    than reading it. Anything else is decoded by pydicom.
    """
    element = ds.get_item("PixelData", keep_deferred=True)
    bits = int(ds.BitsAllocated)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if (
        isinstance(element, RawDataElement)
        and element.value is None
        and isinstance(ds.filename, str)
        and syntax in _NATIVE_SYNTAXES
        and bits in (8, 16)
    ):
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        stored = _scratch((int(ds.Rows), int(ds.Columns)), dtype, "stored")
        with open(ds.filename, "rb") as file:
            file.seek(element.value_tell)
            if file.readinto(memoryview(stored).cast("B")) != stored.nbytes:
                raise NotAnalysable("The pixel data is truncated.", code="no_pixels")
        _mask_unused_bits(stored, int(ds.get("BitsStored", bits)))
        return stored
    stored = pixel_array(ds)
    return stored if stored.flags.writeable else stored.copy()


def _mask_unused_bits(stored: npt.NDArray[Any], bits_stored: int) -> None:
    """Ignore the bits above High Bit, in place, as pydicom does: zeroed when unsigned,
    copies of the sign bit when signed."""
    unused = stored.itemsize * 8 - bits_stored
    if unused <= 0:
        return
    if stored.dtype.kind == "u":
        np.bitwise_and(stored, (1 << bits_stored) - 1, out=stored)
    else:
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)


def _stored_window(
    stored: npt.NDArray[Any], ds: Dataset, window: tuple[float, float] | None
) -> tuple[int, int, bool] | None:
    """The VOI as a clip of the stored integers to ``(low, high)``, and whether any value lies
    outside it; None unless it is exactly that.

    It is when the modality LUT is a rescale with a positive slope and the window (the spec's,
    the file's linear window, or the image's own range) falls on whole stored values: then
    clipping the integers at full size and scaling after resizing gives the same pixels as
    scaling every value first, at a fraction of the memory traffic.
    """
    if stored.dtype.kind not in "iu" or "ModalityLUTSequence" in ds:
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope <= 0:
        return None
    if window is None and ds.get("VOILUTSequence"):
        return None
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() != "LINEAR":
            return None
        centre, width = float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth))
        window = (centre - width / 2, centre + width / 2)
    if window is None:
        least, most = int(stored.min()), int(stored.max())
        return (least, most, False) if most > least else None
    low, high = ((value - intercept) / slope for value in window)
    info = np.iinfo(stored.dtype)
    if not (low.is_integer() and high.is_integer() and low <= info.max and high >= info.min):
        return None
    return int(low), int(high), True


def _display_values(
    values: npt.NDArray[Any], ds: Dataset, window: tuple[float, float] | None
) -> tuple[Array, float]:
    """Modality values to display intensities, dark to bright as MONOCHROME2.

    The intensities are the returned array times the returned scale, in [0, 1]: the scale is
    applied after resizing, on a small fraction of the pixels (it commutes with resampling).
    """
    if window is not None:
        return _clipped(values, *window)
    if ds.get("VOILUTSequence"):
        return _voi_lut_values(values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            return (1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))).astype(np.float32), 1.0
        return _clipped(values, centre - width / 2, centre + width / 2)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.float32), 1.0
    return _clipped(values, low, high)


def _voi_lut_values(values: npt.NDArray[Any], ds: Dataset) -> tuple[Array, float]:
    """Apply the first VOI LUT; scale its lowest entry to 0 and its highest to 1.

    Scaling by the LUT's entries rather than its nominal bit depth copes with vendors whose
    LUTs use 12 of 16 declared bits; it depends on the LUT only, never on the image content.
    """
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    table = apply_voi(np.arange(first, first + entries), ds).astype(np.float64)
    low, high = float(table.min()), float(table.max())
    mapped = apply_voi(np.rint(values).astype(np.int64), ds)
    if high <= low:
        return np.zeros(values.shape, np.float32), 1.0
    return _clipped(mapped, low, high)


def _clipped(values: npt.NDArray[Any], low: float, high: float) -> tuple[Array, float]:
    """``values - low`` clipped to [0, high - low], and the scale to [0, 1], in this thread's
    scratch buffer: valid until the thread's next radiograph."""
    # A radiograph is 4 to 9 million pixels: each fresh float32 array of that size costs
    # thousands of page faults on these hosts, and each pass over it a few ms.
    shifted = _scratch(values.shape)
    np.subtract(values, np.float32(low), out=shifted, dtype=np.float32)
    np.clip(shifted, np.float32(0.0), np.float32(high - low), out=shifted)
    return shifted, 1.0 / (high - low)


_thread_scratch = threading.local()


def _scratch(shape: tuple[int, ...], dtype: npt.DTypeLike = np.float32, name: str = "float") -> Any:
    """This thread's scratch array ``name`` of ``shape`` and ``dtype``, reused from one image
    to the next: valid until the thread asks for ``name`` again."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    flat: npt.NDArray[np.uint8] | None = getattr(_thread_scratch, name, None)
    if flat is None or flat.size < nbytes:
        flat = np.empty(nbytes, np.uint8)
        setattr(_thread_scratch, name, flat)
    return flat[:nbytes].view(dtype).reshape(shape)


def letterbox(shape: tuple[int, int], size: tuple[int, int]) -> tuple[float, int, int]:
    """Where an image of ``shape`` (rows, columns) lands in a model input of ``size`` (H, W).

    Returns ``(scale, top, left)``: both axes are scaled by ``scale`` (the long side fills the
    input) and the image is centred with ``top`` rows and ``left`` columns of padding above and
    to the left. A model-input point ``(x, y)`` is image pixel ``((x - left) / scale,
    (y - top) / scale)``.
    """
    rows, columns = shape
    height, width = size
    scale = min(height / rows, width / columns)
    top = (height - _scaled(rows, scale, height)) // 2
    left = (width - _scaled(columns, scale, width)) // 2
    return scale, top, left


def _scaled(length: int, scale: float, limit: int) -> int:
    return min(limit, max(1, round(length * scale)))


def _fit(
    image: npt.NDArray[Any],
    spec: PreprocessSpec,
    *,
    offset: float = 0.0,
    scale: float = 1.0,
    invert: bool = False,
    peak: int | None = None,
) -> Array:
    """Resize the long side to the model size (antialiased), map each intensity ``v`` to
    ``(v - offset) * scale`` (then ``1 - that`` if ``invert``), pad with black and normalise.
    ``peak``, when known, bounds an integer image's values (see :func:`_box_mean`).

    The intensity mapping is affine, so it is done after resizing, on the small image.
    """
    height, width = spec.size
    rows, columns = image.shape
    scale_to_fit, top, left = letterbox((rows, columns), (height, width))
    new_rows, new_columns = (
        _scaled(rows, scale_to_fit, height),
        _scaled(columns, scale_to_fit, width),
    )
    resized = _resize(image, new_rows, new_columns, peak=peak)
    if offset:
        resized -= np.float32(offset)
    resized *= np.float32(scale)
    if invert:
        np.subtract(np.float32(1.0), resized, out=resized)
    out = np.zeros((1, height, width), np.float32)
    out[0, top : top + new_rows, left : left + new_columns] = resized
    out -= np.float32(spec.mean)
    out /= np.float32(spec.std)
    return out


_REDUCING_GAP = 2.0


def _resize(image: npt.NDArray[Any], rows: int, columns: int, *, peak: int | None = None) -> Array:
    """Pillow's bilinear resize with ``reducing_gap=2``, the box-averaging step done in numpy.

    Pillow's bilinear filter widens with the reduction factor, so downsizing averages. With a
    reducing gap it first box-averages by an integer factor per axis (keeping at least twice
    the target size), then filters: nearly the same pixels (mean difference 3e-4 on a real
    radiograph) at less than half the cost. Doing the box-average here gives Pillow's pixels
    (to 1e-7) without first copying the full-size image into Pillow's memory, and straight
    from stored integers.
    """
    height, width = image.shape
    factor_x = int(width / columns / _REDUCING_GAP) or 1
    factor_y = int(height / rows / _REDUCING_GAP) or 1
    if factor_x > 1 or factor_y > 1:
        image = _box_mean(image, factor_y, factor_x, peak=peak)
    box = (0.0, 0.0, width / factor_x, height / factor_y)
    pil = Image.fromarray(np.ascontiguousarray(image, np.float32))
    return np.array(pil.resize((columns, rows), Image.Resampling.BILINEAR, box=box), np.float32)


def _box_mean(
    image: npt.NDArray[Any], factor_y: int, factor_x: int, *, peak: int | None = None
) -> Array:
    """The float32 mean of each ``factor_y`` x ``factor_x`` block; edge blocks average what
    they hold, as Pillow's ``Image.reduce`` does.

    Sums are exact for integer images: in uint16 when the values are unsigned and at most
    ``peak`` and a block's sum fits (a 12-bit radiograph in 4x4 blocks: half the memory
    traffic of float32), else in float32, which holds any sum of up to 256 16-bit values.
    """
    height, width = image.shape
    narrow = image.dtype.kind == "u" and peak is not None and peak * factor_y * factor_x < 65536
    rows = _scratch((-(-height // factor_y), width), np.uint16 if narrow else np.float32, "box")
    np.copyto(rows, image[0::factor_y])
    for offset in range(1, factor_y):
        part = image[offset::factor_y]
        rows[: len(part)] += part
    out = rows[:, 0::factor_x].copy()
    for offset in range(1, factor_x):
        part = rows[:, offset::factor_x]
        out[:, : part.shape[1]] += part
    means: Array = out.astype(np.float32, copy=False)
    row_counts = np.full(means.shape[0], factor_y, np.float32)
    row_counts[-1] = height - factor_y * (means.shape[0] - 1)
    column_counts = np.full(means.shape[1], factor_x, np.float32)
    column_counts[-1] = width - factor_x * (means.shape[1] - 1)
    means /= row_counts[:, None] * column_counts[None, :]
    return means


# --- CT volumes --------------------------------------------------------------------------------


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
    _require_dims(spec, 3)
    assert spec.window is not None
    headers = [_header(source) for source in sources]
    geometry = _series_geometry(headers, spec)
    first = headers[0]
    volume = (buffer or VolumeBuffer()).take((len(headers), int(first.Rows), int(first.Columns)))
    low, high = spec.window
    for slot, index in enumerate(geometry.order):
        header = headers[index]
        _require_pixels(header)
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
    return dcmread(source, defer_size=_HEADER_DEFER_SIZE)


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


# --- quality gate ------------------------------------------------------------------------------


def check_radiograph(ds: Dataset, spec: PreprocessSpec) -> None:
    """Raise :class:`NotAnalysable` unless ``ds`` is an image this radiograph model may read."""
    _require_dims(spec, 2)
    _check_instance(ds, spec)
    if str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
        raise NotAnalysable(
            "Raw detector image (For Processing); the processed image For Presentation is needed.",
            code="for_processing",
        )


def check_ct_series(sources: Sequence[SliceSource], spec: PreprocessSpec) -> None:
    """Raise :class:`NotAnalysable` unless the series is one this CT model may read.

    Reads headers only (paths are read without their pixel data).
    """
    _require_dims(spec, 3)
    headers = [_header(source) for source in sources]
    # Before the per-image checks: a scout or a short series is the common, plainer reason.
    _require_slice_count(len(headers), spec)
    for header in headers:
        _check_instance(header, spec)
    _series_geometry(headers, spec)


def _check_instance(ds: Dataset, spec: PreprocessSpec) -> None:
    """The checks every image of a study passes, whatever the model's dimensions.

    Secondary Capture: archives and anonymisers often wrap real radiographs as SC (the SIIM
    chest CR is one), keeping the acquisition's Modality. An SC object is accepted only with
    Modality CR or DX and an Image Type, when present, that is neither DERIVED nor SECONDARY;
    any other SC (screenshots, scanned documents, a CT page) is refused.
    """
    _require_pixels(ds)
    modality = str(ds.get("Modality", "")).upper()
    if spec.modalities and modality not in spec.modalities:
        raise NotAnalysable(
            f"Modality {modality or 'unknown'}; this model reads {'/'.join(spec.modalities)}.",
            code="modality",
        )
    image_type = [str(value).upper() for value in _values(ds.get("ImageType"))]
    if "DERIVED" in image_type or "SECONDARY" in image_type:
        shown = "\\".join(image_type)
        raise NotAnalysable(
            f"Derived or secondary image (Image Type {shown}): reformats, "
            "projections and processed copies are not analysed.",
            code="derived",
        )
    if ds.get("SOPClassUID") in SECONDARY_CAPTURE_CLASSES and modality not in RADIOGRAPH_MODALITIES:
        raise NotAnalysable(
            "Secondary capture (screenshot or scanned document), not an original acquisition.",
            code="secondary_capture",
        )
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if spec.body_parts and body_part and not any(part in body_part for part in spec.body_parts):
        raise NotAnalysable(
            f"Body part examined is {body_part}; this model reads {'/'.join(spec.body_parts)}.",
            code="body_part",
        )
    age = patient_age_years(ds)
    too_young = spec.min_age_years is not None and age is not None and age < spec.min_age_years
    too_old = spec.max_age_years is not None and age is not None and age > spec.max_age_years
    if too_young or too_old:
        raise NotAnalysable(
            f"Patient age {age:.0f} years is outside the population this model was validated "
            f"on ({_age_range(spec)}).",
            code="population",
        )


def patient_age_years(ds: Dataset) -> float | None:
    """Age at the study from Patient's Age, else from birth date and study date; None if unknown.

    A Patient's Age without a unit (``"62"``, seen in anonymised public data) is read as years.
    """
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY]?)", text)
    if match:
        per_year = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0, "": 1.0}
        return int(match[1]) / per_year[match[2]]
    birth = _date(ds.get("PatientBirthDate"))
    keywords = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
    taken = next((d for d in (_date(ds.get(k)) for k in keywords) if d is not None), None)
    if birth is None or taken is None or taken < birth:
        return None
    return (taken - birth).days / 365.25


METADATA_FEATURES = (
    "age_years/100",
    "age_known",
    "sex_male",
    "sex_female",
    "view_pa",
    "view_ap",
    "view_lateral",
)
_LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "RLD", "LLD")


def metadata_features(ds: Dataset | None) -> Array:
    """PatientAge (or birth and study dates), PatientSex and ViewPosition as the fused head of
    a ``--with-meta`` model reads them (:data:`METADATA_FEATURES`); unknown values are zeros,
    as for a JPEG/PNG image (``None``), which has no header."""
    features = np.zeros(len(METADATA_FEATURES), np.float32)
    if ds is None:
        return features
    age = patient_age_years(ds)
    if age is not None:
        features[0:2] = (min(age, 120.0) / 100.0, 1.0)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    features[2:] = (sex == "M", sex == "F", view == "PA", view == "AP", view in _LATERAL_VIEWS)
    return features


def _age_range(spec: PreprocessSpec) -> str:
    if spec.min_age_years is not None and spec.max_age_years is not None:
        return f"{spec.min_age_years:g} to {spec.max_age_years:g} years"
    if spec.min_age_years is not None:
        return f"{spec.min_age_years:g} years and over"
    return f"up to {spec.max_age_years:g} years"


def _date(value: Any) -> date | None:
    try:
        return datetime.strptime(str(value or ""), "%Y%m%d").date()
    except ValueError:
        return None


def _require_slice_count(count: int, spec: PreprocessSpec) -> None:
    if count < spec.min_slices:
        raise NotAnalysable(
            f"Only {count} slices; at least {spec.min_slices} are needed for a CT volume.",
            code="too_few_slices",
        )


def _require_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise NotAnalysable("The image has no pixel data.", code="no_pixels")


def _require_dims(spec: PreprocessSpec, dims: int) -> None:
    if spec.dims != dims:
        raise ValueError(f"this function needs a {dims}D spec, got a {spec.dims}D one")


def _values(value: Any) -> list[Any]:
    """A multi-valued DICOM attribute as a list (pydicom gives a bare value when VM is 1)."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)


def _first(value: Any) -> Any:
    values = _values(value)
    return values[0]

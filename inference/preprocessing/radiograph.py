"""Radiographs to model input: CR/DX DICOM (any transfer syntax pydicom decodes) and
JPEG/PNG become float32 ``[1, H, W]``.

Modality LUT, then the VOI (the spec's window, else the file's VOI LUT, else its window, else
the image's own range) to [0, 1], MONOCHROME1 inverted, the long side resized to the model size
with the aspect ratio kept (antialiased), the rest padded with black, then ``(x - mean) / std``.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.preprocessing.spec import (
    Array,
    NotAnalysable,
    PreprocessSpec,
    dicom_header,
    first_value,
    require_dims,
    require_pixels,
)


def radiograph_from_dataset(ds: Dataset, spec: PreprocessSpec) -> Array:
    """The model input ``[1, H, W]`` for a single-frame greyscale DICOM image.

    A dataset read with :func:`dicom_header` (pixel data left on disk) is read fastest.
    """
    require_dims(spec, 2)
    require_pixels(ds)
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


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file is DICOM Part 10 ("DICM" after the 128-byte preamble)."""
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def radiograph_from_file(path: str | os.PathLike[str], spec: PreprocessSpec) -> Array:
    """The model input ``[1, H, W]`` for a DICOM file (told by its content) or a Pillow image."""
    require_dims(spec, 2)
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
        centre, width = float(first_value(ds.WindowCenter)), float(first_value(ds.WindowWidth))
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
        centre = float(first_value(ds.WindowCenter))
        width = float(first_value(ds.WindowWidth))
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

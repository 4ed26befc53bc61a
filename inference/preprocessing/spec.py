"""What a model's input is (:class:`PreprocessSpec`), why an image may not be analysed
(:class:`NotAnalysable`), and the small reads every part of preprocessing shares."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread

Array: TypeAlias = npt.NDArray[np.float32]

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
RADIOGRAPH_MODALITIES = ("CR", "DX")

# Headers are read with large values (pixel data) left on disk until decoded.
HEADER_DEFER_SIZE = "64 KB"


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


def dicom_header(path: str | os.PathLike[str]) -> Dataset:
    """A DICOM file's data set with its large values (pixel data) left on disk until used."""
    return dcmread(path, defer_size=HEADER_DEFER_SIZE)


def require_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise NotAnalysable("The image has no pixel data.", code="no_pixels")


def require_dims(spec: PreprocessSpec, dims: int) -> None:
    if spec.dims != dims:
        raise ValueError(f"this function needs a {dims}D spec, got a {spec.dims}D one")


def dicom_values(value: Any) -> list[Any]:
    """A multi-valued DICOM attribute as a list (pydicom gives a bare value when VM is 1)."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    return list(value)


def first_value(value: Any) -> Any:
    values = dicom_values(value)
    return values[0]

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
CT resampling, so importing this package costs numpy, Pillow and pydicom only.
"""

from inference.preprocessing.ct import CtVolume, VolumeBuffer, check_ct_series, ct_volume
from inference.preprocessing.header import (
    METADATA_FEATURES,
    SECONDARY_CAPTURE_CLASSES,
    check_radiograph,
    metadata_features,
    patient_age_years,
)
from inference.preprocessing.radiograph import (
    is_dicom_file,
    letterbox,
    radiograph_from_dataset,
    radiograph_from_file,
)
from inference.preprocessing.spec import (
    CHEST_BODY_PARTS,
    CHEST_CT,
    CHEST_XRAY,
    RADIOGRAPH_MODALITIES,
    Array,
    NotAnalysable,
    PreprocessSpec,
    dicom_header,
)

__all__ = [
    "CHEST_BODY_PARTS",
    "CHEST_CT",
    "CHEST_XRAY",
    "METADATA_FEATURES",
    "RADIOGRAPH_MODALITIES",
    "SECONDARY_CAPTURE_CLASSES",
    "Array",
    "CtVolume",
    "NotAnalysable",
    "PreprocessSpec",
    "VolumeBuffer",
    "check_ct_series",
    "check_radiograph",
    "ct_volume",
    "dicom_header",
    "is_dicom_file",
    "letterbox",
    "metadata_features",
    "patient_age_years",
    "radiograph_from_dataset",
    "radiograph_from_file",
]

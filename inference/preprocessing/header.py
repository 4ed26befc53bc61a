"""What a header allows and tells: the per-image quality gate, the patient's age, and the
metadata features a ``--with-meta`` model reads."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.uid import (
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from inference.preprocessing.spec import (
    RADIOGRAPH_MODALITIES,
    Array,
    NotAnalysable,
    PreprocessSpec,
    dicom_values,
    require_dims,
    require_pixels,
)

SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)


def check_radiograph(ds: Dataset, spec: PreprocessSpec) -> None:
    """Raise :class:`NotAnalysable` unless ``ds`` is an image this radiograph model may read."""
    require_dims(spec, 2)
    check_instance(ds, spec)
    if str(ds.get("PresentationIntentType", "")).upper() == "FOR PROCESSING":
        raise NotAnalysable(
            "Raw detector image (For Processing); the processed image For Presentation is needed.",
            code="for_processing",
        )


def check_instance(ds: Dataset, spec: PreprocessSpec) -> None:
    """The checks every image of a study passes, whatever the model's dimensions.

    Secondary Capture: archives and anonymisers often wrap real radiographs as SC (the SIIM
    chest CR is one), keeping the acquisition's Modality. An SC object is accepted only with
    Modality CR or DX and an Image Type, when present, that is neither DERIVED nor SECONDARY;
    any other SC (screenshots, scanned documents, a CT page) is refused.
    """
    require_pixels(ds)
    modality = str(ds.get("Modality", "")).upper()
    if spec.modalities and modality not in spec.modalities:
        raise NotAnalysable(
            f"Modality {modality or 'unknown'}; this model reads {'/'.join(spec.modalities)}.",
            code="modality",
        )
    image_type = [str(value).upper() for value in dicom_values(ds.get("ImageType"))]
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

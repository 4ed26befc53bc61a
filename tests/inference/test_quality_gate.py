"""The quality gate: which images a model never sees, and the reason the radiologist reads."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage

from inference.preprocessing import (
    CHEST_CT,
    CHEST_XRAY,
    NotAnalysable,
    check_ct_series,
    check_radiograph,
    ct_volume,
    patient_age_years,
)
from tests.factories import CR_JPEG, CT_SERIES, make_dataset

CT_FILES = sorted(CT_SERIES.glob("*.dcm"))


def read_series() -> list[Dataset]:
    """The real series' headers, pixel data left on disk."""
    return [dcmread(path, defer_size="64 KB") for path in CT_FILES]


def refused_radiograph(ds: Dataset, **spec_fields: object) -> NotAnalysable:
    spec = dataclasses.replace(CHEST_XRAY, **spec_fields)  # type: ignore[arg-type]
    with pytest.raises(NotAnalysable) as refused:
        check_radiograph(ds, spec)
    return refused.value


def refused_series(series: list[Dataset]) -> NotAnalysable:
    with pytest.raises(NotAnalysable) as refused:
        check_ct_series(series, CHEST_CT)
    return refused.value


def test_the_real_cr_and_the_real_ct_series_pass() -> None:
    cr = dcmread(CR_JPEG)

    check_radiograph(cr, CHEST_XRAY)
    check_ct_series(CT_FILES, CHEST_CT)
    assert cr.SOPClassUID == SecondaryCaptureImageStorage, "a real CR wrapped as SC passes"


@pytest.mark.parametrize("body_part", ["CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", ""])
def test_chest_or_unknown_body_parts_pass(body_part: str) -> None:
    ds = dcmread(CR_JPEG)
    ds.BodyPartExamined = body_part

    check_radiograph(ds, CHEST_XRAY)


def test_another_body_part_is_refused() -> None:
    ds = dcmread(CR_JPEG)
    ds.BodyPartExamined = "KNEE"

    refused = refused_radiograph(ds)

    assert refused.code == "body_part"
    assert "KNEE" in refused.reason


def test_too_few_slices_are_refused() -> None:
    refused = refused_series(read_series()[:12])

    assert refused.code == "too_few_slices"
    assert refused.reason == "Only 12 slices; at least 20 are needed for a CT volume."


def test_a_missing_slice_is_refused_as_uneven_spacing() -> None:
    series = read_series()
    del series[14]

    refused = refused_series(series)

    assert refused.code == "spacing"
    assert "8.00 to 16.00 mm" in refused.reason


def test_two_slices_at_one_position_are_refused() -> None:
    series = read_series()
    series[3].ImagePositionPatient = series[4].ImagePositionPatient

    assert refused_series(series).code == "spacing"


def test_mixed_orientations_are_refused() -> None:
    series = read_series()
    series[7].ImageOrientationPatient = [1, 0, 0, 0, 0.995, -0.0998]

    assert refused_series(series).code == "orientation"


def test_a_sagittal_series_is_refused() -> None:
    series = read_series()
    for ds in series:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    refused = refused_series(series)

    assert refused.code == "not_axial"
    with pytest.raises(NotAnalysable, match="axial"):
        ct_volume(series, CHEST_CT)


def test_an_image_without_pixel_data_is_refused() -> None:
    ds = dcmread(CR_JPEG)
    del ds.PixelData
    series = read_series()
    del series[5].PixelData

    assert refused_radiograph(ds).code == "no_pixels"
    assert refused_series(series).code == "no_pixels"


def test_a_derived_series_is_refused() -> None:
    series = read_series()
    for ds in series:
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]

    refused = refused_series(series)

    assert refused.code == "derived"
    assert "DERIVED\\SECONDARY\\MPR" in refused.reason


def test_a_secondary_capture_of_another_modality_is_refused() -> None:
    screenshot = dcmread(CR_JPEG)
    screenshot.Modality = "OT"
    derived_cr = dcmread(CR_JPEG)
    derived_cr.ImageType = ["DERIVED", "SECONDARY"]

    assert refused_radiograph(screenshot, modalities=()).code == "secondary_capture"
    assert refused_radiograph(derived_cr).code == "derived"


def test_another_modality_is_refused() -> None:
    ct_slice = dcmread(CT_FILES[0])

    refused = refused_radiograph(ct_slice)

    assert refused.code == "modality"
    assert refused.reason == "Modality CT; this model reads CR/DX."


def test_a_raw_for_processing_radiograph_is_refused() -> None:
    ds = dcmread(CR_JPEG)
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PROCESSING"

    assert refused_radiograph(ds).code == "for_processing"


def test_a_patient_outside_the_validated_population_is_refused() -> None:
    adult = dcmread(CR_JPEG)  # Patient's Age "62"

    refused = refused_radiograph(adult, max_age_years=17)

    assert refused.code == "population"
    assert refused.reason == (
        "Patient age 62 years is outside the population this model was validated on "
        "(up to 17 years)."
    )
    check_radiograph(adult, dataclasses.replace(CHEST_XRAY, min_age_years=18))


def test_an_unknown_age_passes_an_age_limited_model() -> None:
    ds = dcmread(CR_JPEG)
    del ds.PatientAge

    check_radiograph(ds, dataclasses.replace(CHEST_XRAY, min_age_years=18, max_age_years=90))


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
@pytest.mark.parametrize(
    ("tags", "years"),
    [
        ({"PatientAge": "053Y"}, 53.0),
        ({"PatientAge": "006M"}, 0.5),
        ({"PatientAge": "002W"}, 14 / 365.25),
        ({"PatientAge": "62"}, 62.0),
        ({"PatientBirthDate": "20160101", "StudyDate": "20260101"}, 3653 / 365.25),
        ({"PatientBirthDate": "", "StudyDate": "20260101"}, None),
        ({"PatientAge": "unknown"}, None),
    ],
)
def test_patient_age_is_read_from_age_or_dates(tags: dict[str, Any], years: float | None) -> None:
    ds = make_dataset(**tags)

    assert patient_age_years(ds) == (pytest.approx(years) if years is not None else None)


def test_the_gate_reads_headers_only_for_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the gate decoded pixel data")

    monkeypatch.setattr("inference.preprocessing.ct.pixel_array", no_decoding)

    check_ct_series(CT_FILES, CHEST_CT)

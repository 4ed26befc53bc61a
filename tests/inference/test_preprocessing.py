"""Preprocessing on real files: the same pixels whatever the encoding, slice order or layout."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless

from inference.preprocessing import (
    CHEST_CT,
    CHEST_XRAY,
    METADATA_FEATURES,
    NotAnalysable,
    PreprocessSpec,
    VolumeBuffer,
    ct_volume,
    letterbox,
    metadata_features,
    radiograph_from_dataset,
    radiograph_from_file,
)
from inference.preprocessing.radiograph import _resize as preprocessing_resize
from tests.conftest import ROOT
from tests.factories import CR_JPEG, CT_SERIES, DATA, make_dataset

CT_FILES = sorted(CT_SERIES.glob("*.dcm"))
KERMANY = sorted((DATA / "cxr" / "kermany-val-fullres").glob("*/*.jpeg"))
SMALL_CT = dataclasses.replace(CHEST_CT, size=(16, 64, 64))
LOSSLESS = [RLELossless, JPEG2000Lossless, JPEGLSLossless]


def read_series() -> list[Dataset]:
    return [dcmread(path) for path in CT_FILES]


def decoded_cr() -> Dataset:
    ds = dcmread(CR_JPEG)
    ds.decompress()
    return ds


def lossless(syntax: UID) -> UID:
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no {syntax.name} encoder: {', '.join(encoder.missing_dependencies)}")
    return syntax


def test_spec_survives_a_json_round_trip() -> None:
    spec = dataclasses.replace(CHEST_CT, mean=0.2, std=0.3, min_age_years=18, max_age_years=90)

    stored = json.loads(json.dumps(spec.to_dict()))

    assert PreprocessSpec.from_dict(stored) == spec
    assert PreprocessSpec.from_dict({"dims": 2, "size": [224, 224]}) == PreprocessSpec(
        dims=2, size=(224, 224)
    )


def test_a_stored_spec_with_an_unknown_key_is_refused() -> None:
    with pytest.raises(ValueError, match="clahe"):
        PreprocessSpec.from_dict({**CHEST_XRAY.to_dict(), "clahe": True})


@pytest.mark.parametrize(
    "fields",
    [{"dims": 2, "size": (224, 224, 3)}, {"dims": 3, "size": (8, 8, 8)}, {"std": 0.0}],
)
def test_an_inconsistent_spec_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        PreprocessSpec(**{"dims": 2, "size": (224, 224), **fields})  # type: ignore[arg-type]


def test_the_cr_radiograph_becomes_a_unit_range_image_then_is_normalised() -> None:
    plain = radiograph_from_file(CR_JPEG, CHEST_XRAY)
    normalised = radiograph_from_file(CR_JPEG, dataclasses.replace(CHEST_XRAY, mean=0.5, std=0.25))

    assert plain.shape == (1, 224, 224)
    assert plain.dtype == np.float32
    assert 0 <= plain.min() < 0.1 < 0.9 < plain.max() <= 1
    np.testing.assert_allclose(normalised, (plain - 0.5) / 0.25, atol=1e-5)


def test_monochrome1_is_inverted_into_the_same_image() -> None:
    plain = radiograph_from_dataset(dcmread(CR_JPEG), CHEST_XRAY)
    ds = decoded_cr()
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"

    np.testing.assert_allclose(radiograph_from_dataset(ds, CHEST_XRAY), plain, atol=1e-5)


def test_a_voi_lut_in_the_file_is_applied() -> None:
    plain = radiograph_from_dataset(dcmread(CR_JPEG), CHEST_XRAY)
    ds = decoded_cr()
    inverting = Dataset()
    inverting.LUTDescriptor = [256, 0, 8]
    inverting.LUTData = list(range(255, -1, -1))
    ds.VOILUTSequence = Sequence([inverting])

    np.testing.assert_allclose(radiograph_from_dataset(ds, CHEST_XRAY), 1 - plain, atol=1e-5)


def test_the_window_in_the_file_and_the_same_window_in_the_spec_agree() -> None:
    ds = dcmread(CR_JPEG)
    ds.WindowCenter, ds.WindowWidth = 100, 120
    from_file = radiograph_from_dataset(ds, CHEST_XRAY)
    del ds.WindowCenter, ds.WindowWidth
    from_spec = radiograph_from_dataset(ds, dataclasses.replace(CHEST_XRAY, window=(40, 160)))

    np.testing.assert_allclose(from_file, from_spec, atol=1e-5)
    assert not np.allclose(from_file, radiograph_from_dataset(ds, CHEST_XRAY), atol=0.05)


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_a_losslessly_recompressed_radiograph_gives_the_same_image(syntax: UID) -> None:
    plain = radiograph_from_dataset(dcmread(CR_JPEG), CHEST_XRAY)
    ds = decoded_cr()
    ds.compress(lossless(syntax))

    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(radiograph_from_dataset(ds, CHEST_XRAY), plain)


def test_every_kermany_jpeg_keeps_its_aspect_ratio_padded_with_black() -> None:
    for path in KERMANY:
        with Image.open(path) as image:
            width, height = image.size
        tensor = radiograph_from_file(path, CHEST_XRAY)
        content = np.flatnonzero(tensor[0].any(axis=1))
        scale, top, left = letterbox((height, width), (224, 224))

        assert tensor.shape == (1, 224, 224), path.name
        # Landscape: full width, height scaled alike, centred between black bands.
        assert content.size == pytest.approx(224 * height / width, abs=2), path.name
        assert abs(content[0] - (223 - content[-1])) <= 1, path.name
        # letterbox() says where the image went, to map heatmap boxes back onto it.
        assert scale == pytest.approx(224 / width), path.name
        assert (top, left) == (content[0], 0), path.name


def test_png_8_and_16_bit_give_the_same_image_as_the_jpeg(tmp_path: Path) -> None:
    jpeg = KERMANY[0]
    with Image.open(jpeg) as image:
        pixels = np.asarray(image.convert("L"))
    Image.fromarray(pixels).save(tmp_path / "8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "16.png")
    expected = radiograph_from_file(jpeg, CHEST_XRAY)

    np.testing.assert_allclose(radiograph_from_file(tmp_path / "8.png", CHEST_XRAY), expected)
    np.testing.assert_allclose(
        radiograph_from_file(tmp_path / "16.png", CHEST_XRAY), expected, atol=1e-6
    )


def test_the_real_ct_series_becomes_the_default_volume_ordered_feet_to_head() -> None:
    volume = ct_volume(CT_FILES, CHEST_CT)
    heights = {
        ds.SOPInstanceUID: float(ds.ImagePositionPatient[2])
        for ds in (dcmread(path, stop_before_pixels=True) for path in CT_FILES)
    }

    assert volume.pixels.shape == (1, 96, 192, 192)
    assert volume.pixels.dtype == np.float32
    assert volume.pixels.min() >= 0
    assert volume.pixels.max() <= 1
    assert volume.spacing_mm == pytest.approx(8.0)
    assert list(volume.slice_uids) == sorted(heights, key=heights.__getitem__)


def test_shuffled_slices_with_scrambled_instance_numbers_give_the_same_volume() -> None:
    plain = ct_volume(CT_FILES, SMALL_CT)
    series = read_series()
    random.Random(7).shuffle(series)
    for number, ds in enumerate(reversed(series), start=1):
        ds.InstanceNumber = number

    shuffled = ct_volume(series, SMALL_CT)

    np.testing.assert_array_equal(shuffled.pixels, plain.pixels)
    assert shuffled.slice_uids == plain.slice_uids


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda uid: uid.name)
def test_losslessly_compressed_slices_give_the_same_volume(syntax: UID) -> None:
    plain = ct_volume(CT_FILES, SMALL_CT)
    series = read_series()
    for ds in series:
        ds.compress(lossless(syntax))

    np.testing.assert_array_equal(ct_volume(series, SMALL_CT).pixels, plain.pixels)


def test_a_prone_series_is_flipped_to_the_standard_axial_view() -> None:
    plain = ct_volume(CT_FILES, SMALL_CT)
    series = read_series()
    for ds in series:
        # Rows and columns reversed; the first pixel is now the old last one.
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, ::-1]).tobytes()
        step = [float(v) for v in ds.PixelSpacing]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + (ds.Columns - 1) * step[1], y + (ds.Rows - 1) * step[0], z]
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]

    np.testing.assert_allclose(ct_volume(series, SMALL_CT).pixels, plain.pixels, atol=1e-6)


def test_hounsfield_units_are_windowed_to_the_unit_range() -> None:
    spec = dataclasses.replace(CHEST_CT, size=(20, 4, 4))
    stored = np.array([[0, 424, 1474, 2524]] * 4, dtype=np.uint16)  # -1024, -600, 450, 1500 HU
    series = [
        make_dataset(
            rows=4,
            columns=4,
            PixelData=stored.tobytes(),
            ImagePositionPatient=[0, 0, 2.5 * index],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[1, 1],
        )
        for index in range(20)
    ]

    pixels = ct_volume(series, spec).pixels

    np.testing.assert_allclose(pixels[0, :, 0], [[0.0, 0.0, 0.5, 1.0]] * 20, atol=1e-6)


def test_a_reused_buffer_gives_the_same_volume_and_never_aliases_a_result() -> None:
    buffer = VolumeBuffer()
    full = ct_volume(CT_FILES, SMALL_CT, buffer=buffer)
    kept = full.pixels.copy()

    part = ct_volume(CT_FILES[:25], SMALL_CT, buffer=buffer)
    again = ct_volume(CT_FILES, SMALL_CT, buffer=buffer)

    np.testing.assert_array_equal(full.pixels, kept)
    np.testing.assert_array_equal(again.pixels, kept)
    assert not np.array_equal(part.pixels, kept)


def test_a_300_slice_512_series_stays_well_under_2_gb(tmp_path: Path) -> None:
    script = f"""
from pathlib import Path
from pydicom import dcmread
from inference.preprocessing import CHEST_CT, ct_volume
paths = []
for block in range(10):
    for path in sorted(Path({str(CT_SERIES)!r}).glob("*.dcm")):
        ds = dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 240 * block]
        paths.append(Path({str(tmp_path)!r}) / f"{{len(paths)}}.dcm")
        ds.save_as(paths[-1])
volume = ct_volume(paths, CHEST_CT)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) through exec.
peak_kib = next(
    int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
)
print(len(volume.slice_uids), peak_kib // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    slices, peak_mib = (int(word) for word in done.stdout.split())

    assert slices == 300
    # About 600 MiB today: torch, the 300 MiB float32 volume and one slice. Stacking the slices
    # or converting through float64 would pass 1 GiB.
    assert peak_mib < 1024


def test_metadata_features_read_age_sex_and_view_and_zero_the_unknown():
    ds = make_dataset(Modality="CR", PatientAge="045Y", PatientSex="F", ViewPosition="AP")
    features = dict(zip(METADATA_FEATURES, metadata_features(ds), strict=True))
    assert features == pytest.approx(
        {
            "age_years/100": 0.45,
            "age_known": 1.0,
            "sex_male": 0.0,
            "sex_female": 1.0,
            "view_pa": 0.0,
            "view_ap": 1.0,
            "view_lateral": 0.0,
        }
    )
    assert not metadata_features(None).any()
    assert not metadata_features(make_dataset(PatientAge="", PatientSex="O")).any()


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((2048, 2048), (224, 224)),
        ((2021, 1733), (224, 192)),
        ((2500, 2048), (512, 419)),
        ((300, 250), (224, 187)),
    ],
)
def test_radiographs_are_resized_to_pillows_pixels(shape, size):
    """The box-average that precedes the bilinear filter is done in numpy, for speed; the
    pixels must stay Pillow's own (reducing_gap=2), which training and the shipped model used."""
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = Image.fromarray(image).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=2.0
    )

    resized = preprocessing_resize(image, *size)

    assert resized.shape == size
    assert np.abs(resized - np.asarray(expected)).max() < 1e-6


def display_reference(ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """The model input computed the plain way: every pixel through the modality LUT and the
    window in float64, then Pillow's own resize (reducing_gap=2) of the whole image."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if spec.window is not None:
        low, high = spec.window
    elif "WindowCenter" in ds:
        centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
        low, high = centre - width / 2, centre + width / 2
    else:
        low, high = values.min(), values.max()
    unit = np.clip((values - low) / (high - low), 0, 1).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1 - unit
    height, width = spec.size
    scale, top, left = letterbox(unit.shape, (height, width))
    rows = min(height, max(1, round(unit.shape[0] * scale)))
    columns = min(width, max(1, round(unit.shape[1] * scale)))
    resized = Image.fromarray(unit).resize(
        (columns, rows), Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    expected = np.zeros((1, height, width), np.float32)
    expected[0, top : top + rows, left : left + columns] = np.asarray(resized)
    return (expected - spec.mean) / spec.std


def synthetic_radiograph(path: Path, shape: tuple[int, int], *, signed: bool, **tags: Any) -> Path:
    """A DX file of random 12-bit values whose four unused high bits hold garbage."""
    rng = np.random.default_rng(7)
    ds = make_dataset(rows=shape[0], columns=shape[1], Modality="DX", **tags)
    del ds.RescaleSlope, ds.RescaleIntercept
    values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, shape)
    garbage = rng.integers(0, 16, shape) << 12
    ds.PixelRepresentation = int(signed)
    ds.PixelData = ((values & 0xFFF) | garbage).astype(np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("shape", "signed", "tags", "window"),
    [
        ((2048, 2048), False, {}, None),
        ((2001, 1703), False, {"PhotometricInterpretation": "MONOCHROME1"}, None),
        ((1500, 1200), False, {"WindowCenter": 2000, "WindowWidth": 1600}, None),
        ((1500, 1200), False, {"WindowCenter": 2000, "WindowWidth": 1601}, None),
        ((1500, 1200), False, {"RescaleSlope": 1, "RescaleIntercept": -1024}, (-500.0, 2000.0)),
        ((1500, 1200), False, {"RescaleSlope": 0.5, "RescaleIntercept": 3}, (100.0, 1900.5)),
        ((1200, 1000), True, {}, None),
        ((1200, 1000), True, {"WindowCenter": 0, "WindowWidth": 3000}, None),
        ((300, 250), False, {}, None),
    ],
    ids=[
        "2048-auto",
        "odd-monochrome1",
        "file-window",
        "file-window-half-values",
        "rescaled-spec-window",
        "fractional-rescale",
        "signed-auto",
        "signed-file-window",
        "small",
    ],
)
def test_stored_radiograph_pixels_give_the_plain_computation(
    tmp_path: Path,
    shape: tuple[int, int],
    signed: bool,
    tags: dict[str, Any],
    window: tuple[float, float] | None,
) -> None:
    """The fast path (pixel data read straight from the file into a reused buffer, the window
    clipped on the stored integers, scaled after resizing) against every pixel in float64."""
    path = synthetic_radiograph(tmp_path / "dx.dcm", shape, signed=signed, **tags)
    spec = dataclasses.replace(CHEST_XRAY, window=window, size=(224, 256), mean=0.4, std=0.3)
    expected = display_reference(dcmread(path), spec)

    fast = radiograph_from_file(path, spec)
    decoded = radiograph_from_dataset(dcmread(path), spec)

    assert np.abs(fast - expected).max() < 2e-5
    np.testing.assert_array_equal(fast, decoded)


def test_a_reused_pixel_buffer_never_leaks_into_the_next_image(tmp_path: Path) -> None:
    first = synthetic_radiograph(tmp_path / "a.dcm", (1024, 1024), signed=False)
    second = make_dataset(rows=512, columns=700, Modality="DX")
    second.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    before = radiograph_from_file(first, CHEST_XRAY)

    other = radiograph_from_file(tmp_path / "b.dcm", CHEST_XRAY)
    again = radiograph_from_file(first, CHEST_XRAY)

    np.testing.assert_array_equal(again, before)
    assert not np.allclose(other, before)


def test_pixel_data_cut_short_on_disk_is_not_analysable(tmp_path: Path) -> None:
    path = synthetic_radiograph(tmp_path / "dx.dcm", (512, 512), signed=False)
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - 1000)

    with pytest.raises(NotAnalysable, match="truncated"):
        radiograph_from_file(path, CHEST_XRAY)

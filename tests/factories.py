"""Datasets built on generate_uid(), for tests that need DICOM without real patient data."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

DATA = Path(__file__).parent / "data"
CT_SERIES = DATA / "ct" / "tcia-lung-dx-a0002"
CR_JPEG = DATA / "cxr" / "siim-cr-chest-pa.dcm"


def make_dataset(*, rows: int = 16, columns: int = 16, **tags: Any) -> Dataset:
    """A small valid CT-like instance with fresh UIDs; ``tags`` override any attribute."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Test^Patient"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDate = "20260101"
    ds.InstanceNumber = 1
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    pixels = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) % 4096
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encode(ds: Dataset) -> bytes:
    """The DICOM Part 10 bytes of a dataset, as the listener hands them to instance_store."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

"""A finished job's results as DICOM objects for the original study (highdicom).

Per job: one Comprehensive SR (the finding, each class's probability, the heatmap's regions, the
model's name, version and sha256, and "not for diagnostic use"; or "not analysed" and why), and
one RGB Secondary Capture per heatmap with that warning burned in. Each object is a new series
in the study the images came from, with the patient and study modules copied from a source
instance, and fresh Series and SOP Instance UIDs.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.db.models import F
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.models import NOT_FOR_DIAGNOSTIC_USE, InferenceJob, OutboxItem, Prediction
from studies.models import Instance
from studies.storage import storage_root

MANUFACTURER = "pacs-ai"
BURNED_IN_TEXT = "AI result — not for diagnostic use"
SR_SERIES_DESCRIPTION = "AI result (not for diagnostic use)"
SC_SERIES_DESCRIPTION = "AI heatmap (not for diagnostic use)"
# High series numbers sort the AI series after the acquired ones in a PACS viewer.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
NOT_ANALYSED = "not analysed"
# UTF-8: model names and reasons are free text; the source's patient name is re-encoded.
CHARACTER_SET = "ISO_IR 192"
# A heatmap is as small as the model's input (64x64, say): enlarged so that the text is legible.
_MIN_WIDTH = 512
_NO_UNITS = codes.UCUM.NoUnits
# Patient orientation letters for the +x, +y and +z axes of the patient coordinate system.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
_LETTERS = {letter for pair in _AXIS_LETTERS for letter in pair}
_PATIENT_AND_STUDY_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object written for a job, as the outbox records it."""

    kind: str
    sop_instance_uid: str
    file_path: str  # relative to INFERENCE_OUTPUT_DIR


def results_write(*, job: InferenceJob) -> list[ResultObject]:
    """Write the job's SR and one Secondary Capture per heatmap under INFERENCE_OUTPUT_DIR.

    Every call makes new objects with new UIDs: the outbox keeps the ones it recorded and
    sends only those. Raises ValueError when the job's series has no stored instance.
    """
    predictions = list(
        job.predictions.select_related("instance").order_by(
            # The series' own prediction first, then the slices or images in order.
            F("slice_index").asc(nulls_first=True),
            "instance__instance_number",
            "pk",
        )
    )
    reference = _reference_instance(job, predictions)
    source = _source_header(reference)
    folder = _output_folder(job)
    written: list[ResultObject] = []
    report = structured_report(
        job=job,
        predictions=predictions,
        source=source,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    written.append(_save(report, OutboxItem.Kind.STRUCTURED_REPORT, folder))
    series_uid = generate_uid()
    with_heatmaps = [prediction for prediction in predictions if prediction.heatmap_path]
    for number, prediction in enumerate(with_heatmaps, start=1):
        capture = heatmap_capture(
            prediction=prediction,
            source=(
                source
                if prediction.instance in (None, reference)
                else _source_header(prediction.instance)
            ),
            series_instance_uid=series_uid,
            sop_instance_uid=generate_uid(),
            instance_number=number,
        )
        written.append(_save(capture, OutboxItem.Kind.SECONDARY_CAPTURE, folder))
    return written


def structured_report(
    *,
    job: InferenceJob,
    predictions: Sequence[Prediction],
    source: Dataset,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR of the job's predictions, in the study of ``source``.

    It says "not for diagnostic use", names the model (name, version, sha256), gives each
    prediction's finding and class probabilities, and its heatmap regions: as SCOORD polylines
    on the source image where the prediction has one, else as text in heatmap pixels. A
    prediction that was not analysed is reported as "not analysed" with its reason.
    """
    lead = predictions[0] if predictions else None
    model_name = lead.model_name if lead else ""
    model_version = lead.model_version if lead else ""
    model_sha256 = lead.model_sha256 if lead else ""
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    content = hd.sr.ContentSequence()
    content.extend(
        hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                # The same model is the same device in every report it makes.
                uid=generate_uid(entropy_srcs=[MANUFACTURER, model_name, model_version]),
                name=MANUFACTURER,
                model_name=model_name or None,
            ),
        )
    )
    content.append(_text(codes.DCM.Comment, NOT_FOR_DIAGNOSTIC_USE))
    if model_name:
        content.extend(
            hd.sr.AlgorithmIdentification(
                name=model_name, version=model_version, parameters=[f"sha256 {model_sha256}"]
            )
        )
    content.append(
        hd.sr.UIDRefContentItem(
            name=codes.DCM.SeriesInstanceUID,
            value=job.series.series_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    content.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.CADProcessingAndFindingsSummary,
            value=_summary(predictions),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    headers: dict[int, Dataset] = {}
    for prediction in predictions:
        content.append(_finding_group(prediction, headers))
    root.ContentSequence = content
    referenced = {p.instance.pk: p.instance for p in predictions if p.instance is not None}
    # The first item of evidence is the one highdicom copies the patient and study from.
    evidence = [_without_names(source)]
    evidence.extend(_evidence(instance, job) for _, instance in sorted(referenced.items()))
    report = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
    )
    report.copy_patient_and_study_information(source)
    report.SpecificCharacterSet = CHARACTER_SET
    return report


def heatmap_capture(
    *,
    prediction: Prediction,
    source: Dataset,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of the prediction's heatmap overlay in the study of ``source``.

    The picture is enlarged to at least 512 pixels wide, with a black band below it that
    carries "AI result — not for diagnostic use" and the model's name and version
    (BurnedInAnnotation YES).
    """
    overlay = Image.open(Path(settings.INFERENCE_OUTPUT_DIR) / prediction.heatmap_path)
    pixels = _burn_in(
        overlay.convert("RGB"),
        [BURNED_IN_TEXT, f"{prediction.model_name} {prediction.model_version}"],
    )
    orientation = _patient_orientation(source)
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_without_names(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom wants an orientation; an unknown one is emptied below (Type 2).
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=prediction.model_name[:64],
        software_versions=prediction.model_version,
        specific_character_set=CHARACTER_SET,
    )
    if orientation is None:
        capture.PatientOrientation = []
    capture.copy_patient_and_study_information(source)
    capture.SpecificCharacterSet = CHARACTER_SET
    capture.BurnedInAnnotation = "YES"
    capture.ConversionType = "WSD"
    capture.ImageComments = (
        f"{NOT_FOR_DIAGNOSTIC_USE}. Model {prediction.model_name} {prediction.model_version}, "
        f"sha256 {prediction.model_sha256}."
    )
    if prediction.instance is not None:
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = source.SOPClassUID
        referenced.ReferencedSOPInstanceUID = source.SOPInstanceUID
        capture.SourceImageSequence = [referenced]
    return capture


def _finding_group(prediction: Prediction, headers: dict[int, Dataset]) -> hd.sr.ContentItem:
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.MeasurementGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items = hd.sr.ContentSequence()
    if prediction.status != Prediction.Status.ANALYSED:
        items.append(_text(codes.DCM.Finding, NOT_ANALYSED))
        items.append(_text(codes.DCM.Comment, prediction.reason or "no reason given"))
    else:
        items.append(_text(codes.DCM.Finding, prediction.label))
    instance = prediction.instance
    if instance is not None:
        items.append(
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=instance.sop_class_uid,
                referenced_sop_instance_uid=instance.sop_instance_uid,
            )
        )
    for label, probability in prediction.probabilities.items():
        number = hd.sr.NumContentItem(
            name=codes.DCM.Probability,
            value=float(probability),
            unit=_NO_UNITS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        # The probability of which class: the concept "Probability", modified by the finding.
        number.ContentSequence = hd.sr.ContentSequence(
            [_text(codes.DCM.Finding, label, hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)]
        )
        items.append(number)
    for box in prediction.boxes:
        if instance is None:
            items.append(_text(codes.DCM.SelectedRegionDescription, _region_text(box)))
            continue
        if instance.pk not in headers:
            headers[instance.pk] = _source_header(instance)
        region = _image_region(box, instance, headers[instance.pk])
        if region is not None:
            items.append(region)
    group.ContentSequence = items
    return group


def _image_region(
    box: dict[str, float], instance: Instance, header: Dataset
) -> hd.sr.ImageRegion | None:
    """A box as a closed polyline in the image's pixel space (0,0 is the top-left pixel's
    outer corner), clipped to the image; None when nothing of it lies inside."""
    columns, rows = float(header.Columns), float(header.Rows)
    left = min(max(float(box["x"]), 0.0), columns)
    top = min(max(float(box["y"]), 0.0), rows)
    right = min(max(float(box["x"]) + float(box["width"]), 0.0), columns)
    bottom = min(max(float(box["y"]) + float(box["height"]), 0.0), rows)
    if right <= left or bottom <= top:
        return None
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(corners, np.float32),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=instance.sop_class_uid,
            referenced_sop_instance_uid=instance.sop_instance_uid,
        ),
    )


def _region_text(box: dict[str, float]) -> str:
    where = f"heatmap slice {box['slice_index']}: " if "slice_index" in box else "heatmap: "
    return (
        f"{where}x {box['x']}, y {box['y']}, width {box['width']}, height {box['height']} "
        f"(model input pixels), peak {box.get('score', '')}"
    )


def _summary(predictions: Sequence[Prediction]) -> hd.sr.CodedConcept:
    """DICOM's CAD summary: whether every prediction was analysed, and whether any is positive."""
    analysed = [p for p in predictions if p.status == Prediction.Status.ANALYSED]
    positive = any(
        p.probability is not None and p.threshold is not None and p.probability >= p.threshold
        for p in analysed
    )
    if not analysed:
        code = codes.DCM.NoAlgorithmsSucceededWithoutFindings
    elif len(analysed) == len(predictions):
        code = (
            codes.DCM.AllAlgorithmsSucceededWithFindings
            if positive
            else codes.DCM.AllAlgorithmsSucceededWithoutFindings
        )
    else:
        code = (
            codes.DCM.NotAllAlgorithmsSucceededWithFindings
            if positive
            else codes.DCM.NotAllAlgorithmsSucceededWithoutFindings
        )
    return hd.sr.CodedConcept.from_code(code)


def _text(
    name: Code,
    value: str,
    relationship: hd.sr.RelationshipTypeValues = hd.sr.RelationshipTypeValues.CONTAINS,
) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=relationship)


def _burn_in(overlay: Image.Image, lines: list[str]) -> npt.NDArray[np.uint8]:
    scale = max(1, math.ceil(_MIN_WIDTH / overlay.width))
    picture = overlay.resize(
        (overlay.width * scale, overlay.height * scale), Image.Resampling.BILINEAR
    )
    font_size = max(14, picture.width // 32)
    font = ImageFont.load_default(size=font_size)
    line_height = round(font_size * 1.4)
    band = line_height * len(lines) + font_size
    canvas = Image.new("RGB", (picture.width, picture.height + band), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        top = picture.height + font_size // 2 + number * line_height
        draw.text((font_size // 2, top), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, np.uint8)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's row and column directions as patient orientation letters, if known.

    The heatmap keeps the source image's orientation (a CT montage: that of its slices).
    """
    given = source.get("PatientOrientation")
    if given and len(given) == 2 and all(value in _LETTERS for value in given):
        return str(given[0]), str(given[1])
    cosines = source.get("ImageOrientationPatient")
    if not cosines or len(cosines) != 6:
        return None
    return _direction_letter(cosines[:3]), _direction_letter(cosines[3:])


def _direction_letter(vector: Sequence[float]) -> str:
    axis = max(range(3), key=lambda index: abs(float(vector[index])))
    positive, negative = _AXIS_LETTERS[axis]
    return positive if float(vector[axis]) > 0 else negative


def _reference_instance(job: InferenceJob, predictions: Sequence[Prediction]) -> Instance:
    """The instance whose patient and study modules the results copy."""
    for prediction in predictions:
        if prediction.instance is not None:
            return prediction.instance
    instance = job.series.instances.order_by("instance_number", "pk").first()
    if instance is None:
        raise ValueError(f"job {job.pk}: its series has no stored instance to refer to")
    return instance


def _source_header(instance: Instance) -> Dataset:
    """A stored instance's attributes without pixels; empty Type 2 patient and study
    attributes filled in (highdicom copies them and requires them present)."""
    header = dcmread(storage_root() / instance.file_path, stop_before_pixels=True)
    for keyword in _PATIENT_AND_STUDY_TYPE_2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _without_names(source: Dataset) -> Dataset:
    """A copy of a header with its person names emptied, for highdicom to build on.

    highdicom warns about a single-component name, quoting it: a patient's name would reach the
    logs. The names are copied from the source afterwards with its patient and study modules.
    """
    stand_in = copy.deepcopy(source)
    stand_in.PatientName = ""
    stand_in.ReferringPhysicianName = ""
    return stand_in


def _evidence(instance: Instance, job: InferenceJob) -> Dataset:
    """What the SR's evidence lists for one of the job's instances, from the rows."""
    item = Dataset()
    item.SOPClassUID = instance.sop_class_uid
    item.SOPInstanceUID = instance.sop_instance_uid
    item.StudyInstanceUID = job.series.study.study_instance_uid
    item.SeriesInstanceUID = job.series.series_instance_uid
    return item


def _output_folder(job: InferenceJob) -> Path:
    """The job's folder for DICOM results, from UIDs that were sanitised when stored."""
    series = job.series
    return Path(series.study.study_instance_uid) / series.series_instance_uid / f"job-{job.pk}"


def _save(dataset: Dataset, kind: str, folder: Path) -> ResultObject:
    """Write a dataset as a Part 10 file, atomically, named by its SOP Instance UID."""
    relative = folder / "dicom" / f"{dataset.SOPInstanceUID}.dcm"
    final = Path(settings.INFERENCE_OUTPUT_DIR) / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".writing-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            dataset.save_as(handle, enforce_file_format=True)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ResultObject(
        kind=kind, sop_instance_uid=str(dataset.SOPInstanceUID), file_path=str(relative)
    )

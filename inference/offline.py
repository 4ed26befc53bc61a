"""Offline inference: DICOM files, folders of studies, zip archives or JPEG/PNG images to
report rows, with no server (no worker, queue or listener) and nothing written to the database.

The models are the registered ones (the task's active version or ensemble, or the version
named) and run through the same preprocessing, quality gate, runners and labelling as a
worker's job (:mod:`inference.pipeline`), so a file gets the probability here that it gets
when a PACS sends it. One bad input never stops the batch: it becomes a Failure row with the
reason, which is why whole-input failures are caught broadly below.
"""

from __future__ import annotations

import os
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.conf import settings
from pydicom import Dataset, dcmread
from pydicom.uid import MediaStorageDirectoryStorage
from tqdm import tqdm

from inference import preprocessing
from inference.models import Mode, ModelVersion, Prediction, Task
from inference.pipeline import (
    Array,
    Draft,
    Ensemble,
    draft_from_probabilities,
    per_slice_probabilities,
)
from inference.preprocessing import NotAnalysable, PreprocessSpec
from inference.reports import FAILURE, SUCCESS, ReportRow, pathology
from inference.runners import runner_for
from inference.selectors import active_models

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# RG (digitised film) goes to the X-ray model too: whether it reads it is its spec's decision.
TASK_BY_MODALITY = {"CT": Task.CT3D, "CR": Task.CXR2D, "DX": Task.CXR2D, "RG": Task.CXR2D}
_VOLUME_BUFFER = preprocessing.VolumeBuffer()


@dataclass(frozen=True)
class _File:
    """An input file: read at ``path``; ``shown`` names it in reports (absolute, and
    ``archive.zip/member`` for a member of an archive)."""

    path: Path
    shown: str


@dataclass
class _Group:
    """What is analysed together: the files of one DICOM series, or one JPEG/PNG image."""

    task: str | None
    modality: str = ""
    study_uid: str = ""
    series_uid: str = ""
    image: bool = False
    files: list[_File] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)
    path_to_study: str = ""

    @property
    def folder(self) -> str:
        """The image itself, or the folder that holds all the series' files."""
        if self.image:
            return self.files[0].shown
        return os.path.commonpath([os.path.dirname(file.shown) for file in self.files])

    @property
    def shown(self) -> str:
        """How a result on the whole group names it: its file when it has one, else its folder."""
        return self.files[0].shown if len(self.files) == 1 else self.folder


def model_version_find(text: str) -> ModelVersion:
    """The model version ``NAME:VERSION`` names; for a bare ``NAME``, its active version, else
    its newest registered one. Raises LookupError when none matches."""
    name, _, version = text.partition(":")
    versions = ModelVersion.objects.filter(name=name)
    if version:
        versions = versions.filter(version=version)
    found = (
        versions.filter(status=ModelVersion.Status.ACTIVE).order_by("-pk").first()
        or versions.order_by("-pk").first()
    )
    if found is None:
        known = ", ".join(
            f"{m.name}:{m.version}" for m in ModelVersion.objects.order_by("name", "pk")
        )
        raise LookupError(f"No model version {text} is registered; registered: {known or 'none'}.")
    return found


def files_infer(
    *,
    paths: Sequence[Path],
    mode: str = Mode.PER_SERIES,
    model: str | None = None,
    runner: str | None = None,
    progress: bool = False,
) -> list[ReportRow]:
    """Analyse every DICOM series and JPEG/PNG image under ``paths`` and return report rows.

    ``paths`` are files, folders (searched recursively, hidden files skipped) and ``.zip``
    archives. DICOM files are grouped by StudyInstanceUID and SeriesInstanceUID; each image is
    a group of its own. CT goes to the chest CT task, CR/DX/RG and images to chest X-ray, each
    to its task's active model(s), or to ``model`` (``NAME[:VERSION]``) for that model's task,
    run by ``runner`` ("onnx" or "torch"; default INFERENCE_RUNNER). ``mode`` is per series
    (one row a series or image) or per slice (one row an image, plus one a CT slice).

    JPEG/PNG images carry no header, so the DICOM quality gate (modality, body part, age,
    derived images) cannot judge them; whoever passes an image to this function vouches that it
    is a chest radiograph. A file that is unreadable, a group that is not analysable, or one
    without a model becomes a Failure row with the reason; rows of unreadable files come last.
    ``progress`` shows tqdm bars on standard error.

    Raises LookupError for an unknown ``model`` and ModelIntegrityError for a model file that
    is missing or altered: every result would fail.
    """
    kind = runner or settings.INFERENCE_RUNNER
    requested = model_version_find(model) if model else None
    with ExitStack() as scratch:
        files, failures = _expand(paths, scratch, mode)
        reading = tqdm(files, desc="reading", unit="file", disable=not progress)
        groups, unreadable = _group(reading, mode)
        ensembles = _ensembles({g.task for g in groups if g.task}, requested, kind, mode)
        rows: list[ReportRow] = []
        for group in tqdm(groups, desc="analysing", unit="series", disable=not progress):
            task = group.task
            rows.extend(_analyse(group, ensembles.get(task) if task else None, mode))
    return rows + failures + unreadable


def _expand(
    paths: Sequence[Path], scratch: ExitStack, mode: str
) -> tuple[list[_File], list[ReportRow]]:
    """The files under ``paths`` (zip archives extracted into ``scratch``), and a Failure row
    for each archive that cannot be opened."""
    files: list[_File] = []
    failures: list[ReportRow] = []
    for path in paths:
        shown = path.absolute()
        if path.is_dir():
            files.extend(_File(found, str(found.absolute())) for found in _walk(path))
        elif path.suffix.lower() == ".zip":
            folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="infer-")))
            try:
                with zipfile.ZipFile(path) as archive:
                    # extractall drops absolute paths and "..": nothing lands outside folder.
                    archive.extractall(folder)
            except Exception as error:  # noqa: BLE001 - see the module docstring
                failures.append(_failure(str(shown), f"Cannot open the archive: {error}", mode))
                continue
            files.extend(
                _File(found, f"{shown}/{found.relative_to(folder).as_posix()}")
                for found in _walk(folder)
            )
        else:
            files.append(_File(path, str(shown)))
    return files, failures


def _walk(folder: Path) -> list[Path]:
    """The files under ``folder``, sorted, without hidden ones and macOS archive metadata."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(
            part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts
        )
    )


def _group(files: Iterable[_File], mode: str) -> tuple[list[_Group], list[ReportRow]]:
    """Files grouped by study and series (images alone), in the order first seen, each with
    its study's folder; and a Failure row for each file that is neither DICOM nor an image.

    A DICOMDIR index is skipped, and so is a second copy of an instance (same SOP Instance UID).
    """
    groups: dict[tuple[str, str], _Group] = {}
    failures: list[ReportRow] = []
    for file in files:
        if file.path.suffix.lower() in IMAGE_SUFFIXES:
            groups[(file.shown, "")] = _Group(task=Task.CXR2D, image=True, files=[file])
            continue
        try:
            header = dcmread(file.path, stop_before_pixels=True)
        except Exception as error:  # noqa: BLE001 - see the module docstring
            reason = f"Not a readable DICOM file or JPEG/PNG image: {error}"
            failures.append(_failure(file.shown, reason, mode))
            continue
        if _sop_class(header) == MediaStorageDirectoryStorage:
            continue
        study_uid = str(header.get("StudyInstanceUID", "")).strip()
        series_uid = str(header.get("SeriesInstanceUID", "")).strip()
        # Without UIDs a file is a series of its own, named by its path.
        key = (study_uid, series_uid) if study_uid and series_uid else (file.shown, "")
        modality = str(header.get("Modality", "")).strip().upper()
        group = groups.setdefault(
            key,
            _Group(
                task=TASK_BY_MODALITY.get(modality),
                modality=modality,
                study_uid=study_uid,
                series_uid=series_uid,
            ),
        )
        sop_uid = str(header.get("SOPInstanceUID", ""))
        if sop_uid and sop_uid in group.sop_uids:
            continue
        group.files.append(file)
        group.sop_uids.append(sop_uid)
    # A study's folder holds all its series; a file without UIDs or an image is its own study.
    folders: dict[str, list[str]] = {}
    for group in groups.values():
        folders.setdefault(group.study_uid or group.folder, []).append(group.folder)
    for group in groups.values():
        group.path_to_study = os.path.commonpath(folders[group.study_uid or group.folder])
    return list(groups.values()), failures


def _sop_class(header: Dataset) -> str:
    """The SOP Class UID; a DICOMDIR has it in its file meta only."""
    return str(header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", ""))


def _ensembles(
    tasks: set[str], requested: ModelVersion | None, kind: str, mode: str
) -> dict[str, Ensemble]:
    """The model(s) for each task, loaded now so that a bad model file stops the run at once."""
    ensembles: dict[str, Ensemble] = {}
    for task in sorted(tasks):
        if requested is not None and requested.task == task:
            members = [requested]
        else:
            members = list(active_models(task=task))
        if not members:
            continue
        ensembles[task] = ensemble = Ensemble(members=members, runner=kind)
        for member in members:
            runner_for(model_version=member, kind=kind)
        if task == Task.CT3D and mode == Mode.PER_SLICE:
            runner_for(model_version=ensemble.lead, kind="torch")
    return ensembles


def _analyse(group: _Group, ensemble: Ensemble | None, mode: str) -> list[ReportRow]:
    """The rows of one group; a group that cannot be analysed gets one Failure row."""
    start = time.perf_counter()
    results: list[tuple[str, Draft]]
    if group.task is None:
        reason = (
            f"Modality {group.modality or 'unknown'}: not analysed here "
            "(chest X-ray reads CR/DX, chest CT reads CT)."
        )
        results = [(group.shown, _not_analysed(reason))]
    elif ensemble is None:
        reason = (
            f"No active model for {Task(group.task).label}; an administrator must activate one."
        )
        results = [(group.shown, _not_analysed(reason))]
    else:
        spec = PreprocessSpec.from_dict(ensemble.lead.preprocessing)
        try:
            if group.task == Task.CT3D:
                results = _analyse_ct(group, ensemble, spec, mode)
            else:
                results = _analyse_radiographs(group, ensemble, spec, mode)
        except NotAnalysable as exc:
            results = [(group.shown, _not_analysed(exc.reason))]
        except Exception as error:  # noqa: BLE001 - see the module docstring
            results = [(group.shown, _not_analysed(f"Cannot analyse the images: {error}"))]
    seconds = round(time.perf_counter() - start, 4)
    return [
        ReportRow(
            path_to_study=group.path_to_study,
            study_uid=group.study_uid,
            series_uid=group.series_uid,
            probability_of_pathology=draft.probability,
            pathology=pathology(draft.probability, draft.threshold),
            processing_status=SUCCESS if draft.status == Prediction.Status.ANALYSED else FAILURE,
            time_of_processing=seconds,
            slice_index=draft.slice_index,
            label=draft.label,
            model_name=ensemble.name if ensemble else "",
            model_version=ensemble.version if ensemble else "",
            model_sha256=ensemble.sha256 if ensemble else "",
            reason=draft.reason,
            filename=filename,
            mode=mode,
            probabilities=draft.probabilities,
        )
        for filename, draft in results
    ]


def _analyse_ct(
    group: _Group, ensemble: Ensemble, spec: PreprocessSpec, mode: str
) -> list[tuple[str, Draft]]:
    """The volume's result, then in per-slice mode each slice's, feet to head."""
    paths = [file.path for file in group.files]
    preprocessing.check_ct_series(paths, spec)
    volume = preprocessing.ct_volume(paths, spec, buffer=_VOLUME_BUFFER)
    batch = volume.pixels[None]
    results = [(group.folder, draft_from_probabilities(ensemble, ensemble.probabilities(batch)[0]))]
    if mode == Mode.PER_SLICE:
        shown = {uid: file.shown for uid, file in zip(group.sop_uids, group.files, strict=True)}
        per_slice = per_slice_probabilities(ensemble, batch, len(volume.slice_uids))
        results.extend(
            (shown.get(uid, ""), draft_from_probabilities(ensemble, row, slice_index=index))
            for index, (uid, row) in enumerate(zip(volume.slice_uids, per_slice, strict=True))
        )
    return results


def _analyse_radiographs(
    group: _Group, ensemble: Ensemble, spec: PreprocessSpec, mode: str
) -> list[tuple[str, Draft]]:
    """Each image's result in per-slice mode; else the series' most positive image's (or, when
    none could be analysed, the first image's reason)."""
    inputs: list[tuple[Array, Array]] = []
    refused: dict[int, Draft] = {}
    for index, file in enumerate(group.files):
        try:
            inputs.append(_radiograph_input(file, spec, image=group.image))
        except NotAnalysable as exc:
            refused[index] = _not_analysed(exc.reason)
    probabilities = iter(
        ensemble.probabilities(*(np.stack(arrays) for arrays in zip(*inputs, strict=True)))
        if inputs
        else ()
    )
    results = [
        (
            file.shown,
            refused[index]
            if index in refused
            else draft_from_probabilities(ensemble, next(probabilities)),
        )
        for index, file in enumerate(group.files)
    ]
    if mode == Mode.PER_SERIES:
        analysed = [item for item in results if item[1].status == Prediction.Status.ANALYSED]
        return (
            [max(analysed, key=lambda item: item[1].probability or 0.0)]
            if analysed
            else results[:1]
        )
    return results


def _radiograph_input(file: _File, spec: PreprocessSpec, *, image: bool) -> tuple[Array, Array]:
    """The model input and metadata features of a radiograph: a DICOM file through the quality
    gate, or an image (whose metadata is unknown)."""
    if image:
        return (
            preprocessing.radiograph_from_file(file.path, spec),
            preprocessing.metadata_features(None),
        )
    dataset = dcmread(file.path)
    preprocessing.check_radiograph(dataset, spec)
    return (
        preprocessing.radiograph_from_dataset(dataset, spec),
        preprocessing.metadata_features(dataset),
    )


def _not_analysed(reason: str) -> Draft:
    return Draft(status=Prediction.Status.NOT_ANALYSED, reason=reason)


def _failure(shown: str, reason: str, mode: str) -> ReportRow:
    """The row of an input that could not be read at all."""
    return ReportRow(
        path_to_study=os.path.dirname(shown),
        study_uid="",
        series_uid="",
        probability_of_pathology=None,
        pathology=None,
        processing_status=FAILURE,
        time_of_processing=None,
        reason=reason,
        filename=shown,
        mode=mode,
    )

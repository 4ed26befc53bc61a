"""Labelled samples from the four dataset layouts, their split, and the torch datasets over them.

Layouts (see the README for examples):

- a folder per class: ``ROOT/<label>/<image>`` (JPEG, PNG or DICOM) for radiographs,
  ``ROOT/<label>/<series folder>/<slices>.dcm`` for CT; a reviewed training set exported from
  the admin is such a folder;
- the RSNA Pneumonia Detection Challenge: ``stage_2_train_labels.csv``, optionally
  ``stage_2_detailed_class_info.csv`` (three classes instead of two), and a folder of
  ``<patientId>.dcm``;
- CT registries: CSV files with the columns ``study_key, path, path_type, label`` (``path``
  relative to the CSV, ``path_type`` ``folder`` or ``zip`` of DICOM slices), merged;
- radiologist-confirmed labels: the newest Review of each reviewed prediction, read from the
  database, with the stored DICOM files.

Every sample is read through :mod:`inference.preprocessing`, the code the worker runs.
"""

from __future__ import annotations

import csv
import io
import random
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset, dcmread

from inference import preprocessing
from inference.preprocessing import NotAnalysable, PreprocessSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
SPLITS = ("train", "val", "test")
RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
RSNA_BINARY = ("Normal", "Lung Opacity")
RSNA_THREE = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
REGISTRY_COLUMNS = ("study_key", "path", "path_type", "label")


class DatasetError(ValueError):
    """The dataset cannot be read as given; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One labelled input: an image file, a folder or zip of CT slices, or a list of files.

    ``key`` identifies the sample in split files; ``group`` is the patient or study it belongs
    to, so that the split never puts one patient's images on both sides.
    """

    key: str
    label: str
    group: str
    path: Path | None = None
    files: tuple[Path, ...] = ()
    zipped: bool = False


@dataclass(frozen=True)
class LabelledSet:
    samples: list[Sample]
    source: str

    @property
    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(sample.label for sample in self.samples).items()))


# --- layouts -------------------------------------------------------------------------------------


def folder_per_class(root: Path, *, dims: int, group_pattern: str | None = None) -> LabelledSet:
    """``root/<label>/...``: image files for ``dims`` 2, series folders for ``dims`` 3.

    ``group_pattern`` is a regular expression whose first match in a file or folder name names
    its patient (e.g. ``person\\d+|IM-\\d+`` for the Kermany set); without it each sample is
    its own group.
    """
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder.")
    pattern = re.compile(group_pattern) if group_pattern else None
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        entries = sorted(
            p
            for p in class_dir.iterdir()
            if (p.is_dir() if dims == 3 else p.suffix.lower() in IMAGE_SUFFIXES)
        )
        for entry in entries:
            match = pattern.search(entry.name) if pattern else None
            group = f"{class_dir.name}/{match.group(0)}" if match else entry.name
            key = entry.relative_to(root).as_posix()
            samples.append(Sample(key=key, label=class_dir.name, group=group, path=entry))
    if len({s.label for s in samples}) < 2:
        kind = "series folders" if dims == 3 else "images"
        raise DatasetError(f"{root}: need {kind} in at least two class folders.")
    return LabelledSet(samples, source=f"folder per class: {root}")


def rsna(root: Path) -> LabelledSet:
    """The RSNA challenge layout; three classes when the detailed class file is present."""
    labels_csv = root / RSNA_LABELS
    if not labels_csv.is_file():
        raise DatasetError(f"{root}: no {RSNA_LABELS}.")
    image_dir = _rsna_image_dir(root)
    targets: dict[str, str] = {}
    for row in _csv_rows(labels_csv, ("patientId", "Target")):
        # One row per box: a patient with any box is "Lung Opacity".
        if row["Target"].strip() == "1" or row["patientId"] not in targets:
            targets[row["patientId"]] = RSNA_BINARY[int(row["Target"].strip() == "1")]
    classes_csv = root / RSNA_CLASSES
    if classes_csv.is_file():
        for row in _csv_rows(classes_csv, ("patientId", "class")):
            if row["class"] not in RSNA_THREE:
                raise DatasetError(f"{classes_csv}: unknown class {row['class']!r}.")
            targets[row["patientId"]] = row["class"]
    samples = []
    missing = 0
    for patient, label in sorted(targets.items()):
        path = image_dir / f"{patient}.dcm"
        if not path.is_file():
            missing += 1
            continue
        samples.append(Sample(key=f"{patient}.dcm", label=label, group=patient, path=path))
    if not samples:
        raise DatasetError(f"{image_dir}: none of the {len(targets)} labelled DICOM files.")
    note = f", {missing} labelled images missing" if missing else ""
    return LabelledSet(samples, source=f"RSNA layout: {root}{note}")


def _rsna_image_dir(root: Path) -> Path:
    for name in ("stage_2_train_images", "train_images", "images"):
        if (root / name).is_dir():
            return root / name
    return root


def ct_registries(paths: Sequence[Path]) -> LabelledSet:
    """CT studies listed in one or more registry CSVs; a study key may appear only once."""
    samples: dict[str, Sample] = {}
    for registry in paths:
        for line, row in enumerate(_csv_rows(registry, REGISTRY_COLUMNS), start=2):
            kind = row["path_type"].strip().lower()
            if kind not in ("folder", "zip"):
                raise DatasetError(f"{registry}:{line}: path_type must be folder or zip.")
            key = row["study_key"].strip()
            path = (registry.parent / row["path"].strip()).resolve()
            exists = path.is_dir() if kind == "folder" else path.is_file()
            if not exists:
                raise DatasetError(f"{registry}:{line}: no {kind} at {row['path']!r}.")
            if key in samples:
                raise DatasetError(f"{registry}:{line}: study_key {key!r} is listed twice.")
            samples[key] = Sample(
                key=key, label=row["label"].strip(), group=key, path=path, zipped=kind == "zip"
            )
    names = ", ".join(str(p) for p in paths)
    return LabelledSet(list(samples.values()), source=f"CT registries: {names}")


def reviewed(task: str) -> LabelledSet:
    """The newest review of every reviewed, analysed prediction of ``task``, as samples."""
    # Imported here: it needs the Django app registry, which the file layouts do not.
    from inference.models import Prediction
    from inference.services import latest_reviews, review_final_label
    from studies.storage import storage_root

    predictions = Prediction.objects.filter(job__task=task)
    samples = []
    for review in latest_reviews(predictions=predictions):
        prediction = review.prediction
        series = prediction.series
        if prediction.instance is not None:
            files: tuple[Path, ...] = (storage_root() / prediction.instance.file_path,)
            key = f"instance-{prediction.instance_id}"
        else:
            files = tuple(storage_root() / i.file_path for i in series.instances.order_by("pk"))
            key = f"series-{series.pk}"
        group = f"patient-{series.study.patient_id}"
        samples.append(
            Sample(key=key, label=review_final_label(review=review), group=group, files=files)
        )
    if not samples:
        raise DatasetError(f"No reviewed {task} results in the database.")
    return LabelledSet(samples, source=f"radiologist reviews ({task})")


def load(
    paths: Sequence[Path],
    *,
    task: str,
    group_pattern: str | None = None,
    from_reviews: bool = False,
) -> LabelledSet:
    """The labelled set at ``paths``, its layout told by what is there (see the module doc)."""
    dims = 3 if task == "ct3d" else 2
    if from_reviews:
        if paths:
            raise DatasetError("give dataset paths or --from-reviews, not both")
        return reviewed(task)
    if not paths:
        raise DatasetError("no dataset given")
    if all(path.suffix.lower() == ".csv" for path in paths):
        if dims != 3:
            raise DatasetError("CSV registries list CT studies; use them with the ct3d task")
        return ct_registries(paths)
    if len(paths) != 1:
        raise DatasetError("give one dataset folder (several paths only for CT registry CSVs)")
    root = paths[0]
    if (root / RSNA_LABELS).is_file():
        if dims != 2:
            raise DatasetError("the RSNA layout holds radiographs; use it with the cxr2d task")
        return rsna(root)
    return folder_per_class(root, dims=dims, group_pattern=group_pattern)


def _csv_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(required) - set(reader.fieldnames or ()))
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}.")
            return list(reader)
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


# --- split ---------------------------------------------------------------------------------------


def stratified_split(
    samples: Sequence[Sample], *, seed: int = 42, fractions: tuple[float, float] = (0.70, 0.15)
) -> dict[str, list[Sample]]:
    """Train/val/test by patient group, each class split ``fractions`` (rest test) on its own.

    A group takes the class of its first sample; all its samples go to one side.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.group].append(sample)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, members in sorted(groups.items()):
        by_class[members[0].label].append(group)
    rng = random.Random(seed)
    split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        names = by_class[label]
        rng.shuffle(names)
        train_end = round(len(names) * fractions[0])
        val_size = round(len(names) * fractions[1])
        if len(names) >= 3:  # every part gets at least one group of the class
            val_size = max(1, val_size)
            train_end = min(train_end, len(names) - val_size - 1)
        val_end = train_end + val_size
        for index, group in enumerate(names):
            side = "train" if index < train_end else "val" if index < val_end else "test"
            split[side].extend(groups[group])
    for side in SPLITS:
        split[side].sort(key=lambda sample: sample.key)
        if not split[side]:
            raise DatasetError(f"too few samples for a {side} part: {len(samples)} in all.")
    return split


def split_write(split: dict[str, list[Sample]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "label", "split"])
        for side in SPLITS:
            writer.writerows([sample.key, sample.label, side] for sample in split[side])


def split_read(samples: Sequence[Sample], path: Path) -> dict[str, list[Sample]]:
    """The split a ``split.csv`` (as a run writes) gives; every listed key must exist."""
    by_key = {sample.key: sample for sample in samples}
    split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for line, row in enumerate(_csv_rows(path, ("key", "split")), start=2):
        if row["split"] not in SPLITS:
            raise DatasetError(f"{path}:{line}: split must be one of {', '.join(SPLITS)}.")
        if row["key"] not in by_key:
            raise DatasetError(f"{path}:{line}: no sample {row['key']!r} in the dataset.")
        split[row["split"]].append(by_key[row["key"]])
    return split


# --- tensors -------------------------------------------------------------------------------------


def sample_input(sample: Sample, spec: PreprocessSpec) -> np.ndarray:
    """The model input of one sample, exactly as the worker computes it."""
    if spec.dims == 2:
        source = sample.path or sample.files[0]
        return preprocessing.radiograph_from_file(source, spec)
    return preprocessing.ct_volume(_slices(sample), spec).pixels


def sample_metadata(sample: Sample) -> np.ndarray:
    """A radiograph's metadata features (zeros for JPEG/PNG, which have no DICOM header)."""
    source = sample.path or sample.files[0]
    dicom = preprocessing.is_dicom_file(source)
    header = dcmread(source, stop_before_pixels=True) if dicom else None
    return preprocessing.metadata_features(header)


def _slices(sample: Sample) -> list[Dataset | Path]:
    if sample.files:
        return list(sample.files)
    assert sample.path is not None
    if sample.zipped:
        with zipfile.ZipFile(sample.path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            return [dcmread(io.BytesIO(archive.read(name))) for name in names]
    return sorted(p for p in sample.path.rglob("*") if p.is_file())


Item = tuple[torch.Tensor, torch.Tensor, int]


class SampleDataset(torch.utils.data.Dataset[Item]):
    """(model input, metadata features, class index) per sample; inputs are optionally kept in
    memory (as float16). Metadata features are empty unless the spec fuses metadata."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        spec: PreprocessSpec,
        *,
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.index = {label: i for i, label in enumerate(classes)}
        self.spec = spec
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.metadata: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> list[int]:
        return [self.index[sample.label] for sample in self.samples]

    def __getitem__(self, item: int) -> Item:
        sample = self.samples[item]
        target = self.index[sample.label]
        if item not in self.metadata:
            self.metadata[item] = torch.from_numpy(
                sample_metadata(sample) if self.spec.metadata else np.zeros(0, np.float32)
            )
        if self.cache is not None and item in self.cache:
            return self.cache[item].float(), self.metadata[item], target
        try:
            pixels = torch.from_numpy(sample_input(sample, self.spec))
        except (NotAnalysable, OSError, ValueError) as error:
            raise DatasetError(f"{sample.key}: {error}") from error
        if self.cache is not None:
            # Later epochs read the float16 copy: so does this one, for the same pixels.
            self.cache[item] = pixels.half()
            return self.cache[item].float(), self.metadata[item], target
        return pixels, self.metadata[item], target

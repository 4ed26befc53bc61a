"""The dataset layouts, the patient-grouped stratified split and split files."""

from __future__ import annotations

import csv
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from inference.preprocessing import PreprocessSpec
from tests.factories import CT_SERIES, make_dataset
from training.datasets import (
    DatasetError,
    Sample,
    ct_registries,
    folder_per_class,
    load,
    sample_input,
    split_read,
    split_write,
    stratified_split,
)

KERMANY_NAMES = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "NORMAL2-IM-0002-0001.jpeg"],
    "PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person2_bacteria_3.jpeg"],
}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def kermany_like(root: Path, copies: int = 1) -> Path:
    for label, names in KERMANY_NAMES.items():
        (root / label).mkdir(parents=True)
        for copy in range(copies):
            for name in names:
                (root / label / f"{copy}{name}").write_bytes(b"")
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    return root


def test_folder_per_class_groups_a_patients_images(tmp_path):
    dataset = folder_per_class(kermany_like(tmp_path), dims=2, group_pattern=r"person\d+|IM-\d+")

    assert dataset.counts == {"NORMAL": 3, "PNEUMONIA": 3}
    groups = {sample.key: sample.group for sample in dataset.samples}
    assert groups["PNEUMONIA/0person1_bacteria_1.jpeg"] == groups["PNEUMONIA/0person1_virus_6.jpeg"]
    assert groups["NORMAL/0IM-0001-0001.jpeg"] == groups["NORMAL/0IM-0001-0002.jpeg"]
    assert len(set(groups.values())) == 4


def test_a_folder_with_one_class_is_refused(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="at least two class folders"):
        folder_per_class(tmp_path, dims=2)
    with pytest.raises(DatasetError, match="is not a folder"):
        load([tmp_path / "missing"], task="cxr2d")


def samples(per_class: dict[str, int], group_size: int = 1) -> list[Sample]:
    return [
        Sample(key=f"{label}/{i}", label=label, group=f"{label}-{i // group_size}")
        for label, count in per_class.items()
        for i in range(count)
    ]


def test_the_split_is_stratified_70_15_15_seeded_and_keeps_groups_whole():
    items = samples({"NORMAL": 200, "PNEUMONIA": 600}, group_size=2)

    split = stratified_split(items, seed=42)

    assert stratified_split(items, seed=42) == split
    assert stratified_split(items, seed=7) != split
    for side, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        counts = Counter(sample.label for sample in split[side])
        assert counts["NORMAL"] == pytest.approx(200 * share, abs=2)
        assert counts["PNEUMONIA"] == pytest.approx(600 * share, abs=2)
    sides = {sample.group: side for side in split for sample in split[side]}
    for side in split:
        assert all(sides[sample.group] == side for sample in split[side])
    assert sum(len(part) for part in split.values()) == len(items)


def test_a_tiny_set_still_gets_every_part_and_a_too_small_one_is_refused():
    split = stratified_split(samples({"a": 3, "b": 3}))
    assert [len(split[side]) for side in ("train", "val", "test")] == [2, 2, 2]
    with pytest.raises(DatasetError, match="too few samples"):
        stratified_split(samples({"a": 2, "b": 2}))


def test_a_split_file_round_trips_and_an_unknown_key_is_refused(tmp_path):
    items = samples({"a": 10, "b": 10})
    split = stratified_split(items)
    split_write(split, tmp_path / "split.csv")

    assert split_read(items, tmp_path / "split.csv") == split
    with pytest.raises(DatasetError, match="no sample 'a/0'"):
        split_read(items[1:], tmp_path / "split.csv")


def test_rsna_layout_two_or_three_classes(tmp_path):
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    for patient in ("p1", "p2", "p3"):
        make_dataset(Modality="CR").save_as(images / f"{patient}.dcm", enforce_file_format=True)
    header = ["patientId", "x", "y", "width", "height", "Target"]
    write_csv(
        tmp_path / "stage_2_train_labels.csv",
        header,
        [
            ["p1", "", "", "", "", "0"],
            ["p2", "1", "1", "5", "5", "1"],
            ["p2", "7", "7", "5", "5", "1"],
            ["p3", "", "", "", "", "0"],
            ["p4", "", "", "", "", "0"],  # no image: left out and counted
        ],
    )

    binary = load([tmp_path], task="cxr2d")
    assert binary.counts == {"Lung Opacity": 1, "Normal": 2}
    assert "1 labelled images missing" in binary.source

    write_csv(
        tmp_path / "stage_2_detailed_class_info.csv",
        ["patientId", "class"],
        [["p1", "Normal"], ["p2", "Lung Opacity"], ["p3", "No Lung Opacity / Not Normal"]],
    )
    three = load([tmp_path], task="cxr2d")
    assert three.counts == {"Lung Opacity": 1, "No Lung Opacity / Not Normal": 1, "Normal": 1}
    with pytest.raises(DatasetError, match="cxr2d"):
        load([tmp_path], task="ct3d")


def test_ct_registries_merge_folders_and_zips(tmp_path):
    shutil.copytree(CT_SERIES, tmp_path / "a")
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as archive:
        for path in sorted(CT_SERIES.glob("*.dcm")):
            archive.write(path, f"series/{path.name}")
    first = write_csv(
        tmp_path / "one.csv",
        ["study_key", "path", "path_type", "label"],
        [["s1", "a", "folder", "pathology"]],
    )
    second = write_csv(
        tmp_path / "two.csv",
        ["study_key", "path", "path_type", "label"],
        [["s2", "b.zip", "zip", "normal"]],
    )

    dataset = load([first, second], task="ct3d")

    assert dataset.counts == {"normal": 1, "pathology": 1}
    spec = PreprocessSpec(dims=3, size=(8, 16, 16), window=(-600.0, 1500.0))
    folder, zipped = (sample_input(sample, spec) for sample in dataset.samples)
    assert folder.shape == zipped.shape == (1, 8, 16, 16)
    assert (folder == zipped).all()

    with pytest.raises(DatasetError, match="listed twice"):
        ct_registries([first, first])
    missing = write_csv(
        tmp_path / "bad.csv",
        ["study_key", "path", "path_type", "label"],
        [["s3", "nope", "folder", "normal"]],
    )
    with pytest.raises(DatasetError, match=r"bad\.csv:2: no folder at 'nope'"):
        ct_registries([missing])
    with pytest.raises(DatasetError, match="missing column"):
        ct_registries([write_csv(tmp_path / "cols.csv", ["study_key", "path"], [])])

"""The chest X-ray model shipped in the repository: intact, installable, and as good on the
16 full-resolution Kermany validation images as its card says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from inference.models import ModelVersion
from inference.services import SHIPPED_MODELS_DIR, ShippedModelError, sha256_of
from inference.services import shipped_models_install as install
from tests.factories import DATA

pytestmark = pytest.mark.django_db
FULLRES = DATA / "cxr" / "kermany-val-fullres"
FOLDERS = sorted(p.parent for p in SHIPPED_MODELS_DIR.glob("*/model_card.json"))
MAX_BYTES = 60 * 1024 * 1024


def card_of(folder: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((folder / "model_card.json").read_text())
    return card


def test_a_chest_xray_model_is_shipped_small_and_labelled():
    (folder,) = FOLDERS
    card = card_of(folder)
    assert card["task"] == "cxr2d"
    assert "not for diagnostic use" in card["intended_use"]
    assert card["files"]["onnx_sha256"] == sha256_of(folder / "model.onnx")
    assert card["files"]["weights_sha256"] == sha256_of(folder / "model.pt")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    assert {p.name for p in folder.iterdir()} == {"model.onnx", "model.pt", "model_card.json"}


def test_install_registers_and_activates_once_and_leaves_a_retired_model_retired():
    ((model, action),) = install()
    assert action == "activated"
    assert model.status == ModelVersion.Status.ACTIVE
    assert [a for _, a in install()] == ["present"]
    model.status = ModelVersion.Status.RETIRED
    model.save()
    assert [a for _, a in install()] == ["present"]
    model.refresh_from_db()
    assert model.status == ModelVersion.Status.RETIRED


def test_a_model_file_that_does_not_match_its_card_is_refused(tmp_path):
    copy = tmp_path / "shipped"
    shutil.copytree(FOLDERS[0], copy / FOLDERS[0].name)
    with (copy / FOLDERS[0].name / "model.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ShippedModelError, match="does not match the sha256"):
        install(root=copy)
    assert not ModelVersion.objects.exists()


def test_the_shipped_model_classifies_the_full_resolution_images_as_its_card_claims(
    tmp_path, capsys
):
    call_command("install_shipped_models")
    assert "activated" in capsys.readouterr().out
    card = card_of(FOLDERS[0])
    claim = card["evaluations"]["kermany-val-fullres"]

    call_command(
        "evaluate", f"{card['name']}:{card['version']}", str(FULLRES), "--output", str(tmp_path)
    )

    metrics = json.loads((tmp_path / "metrics.json").read_text())["evaluation"]
    assert metrics["n"] == claim["n"] == 16
    assert metrics["threshold"] == card["threshold"]["value"]
    assert metrics["accuracy"] == pytest.approx(claim["accuracy"])
    assert metrics["confusion"] == claim["confusion"]


def test_evaluate_refuses_labels_the_model_does_not_have(tmp_path):
    install()
    card = card_of(FOLDERS[0])
    (tmp_path / "set" / "COVID").mkdir(parents=True)
    (tmp_path / "set" / "NORMAL").mkdir()
    for name in ("COVID", "NORMAL"):
        shutil.copy(next((FULLRES / "NORMAL").iterdir()), tmp_path / "set" / name / "a.jpeg")
    with pytest.raises(CommandError, match=r"labels \['COVID'\] are not the model's classes"):
        call_command("evaluate", f"{card['name']}:{card['version']}", str(tmp_path / "set"))

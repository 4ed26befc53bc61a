"""``manage.py register_model``: add a trained model's files to the registry as a candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

from inference.management.commands.activate_model import activate, describe_activation
from inference.models import ModelVersion, Task
from inference.preprocessing import CHEST_CT, CHEST_XRAY, PreprocessSpec
from inference.services import model_version_register

DEFAULT_PREPROCESSING = {Task.CXR2D: CHEST_XRAY, Task.CT3D: CHEST_CT}
TASK_DIMS = {Task.CXR2D: 2, Task.CT3D: 3}


class Command(BaseCommand):
    help = (
        "Register a model version: copy its ONNX and PyTorch weights files into the registry, "
        "record their sha256s, and add it as a candidate (or, with --activate, as the active "
        "model of its task, retiring the one before)."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        """Django's parser, in which --version names the model version (not Django's)."""
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="The model's name, e.g. cxr-pneumonia.")
        parser.add_argument("--version", required=True, help="New for this name, e.g. 2026.1.")
        parser.add_argument("--task", required=True, choices=Task.values)
        parser.add_argument(
            "--architecture", required=True, choices=ModelVersion.Architecture.values
        )
        parser.add_argument(
            "--labels", required=True, help="The network's outputs in order, e.g. NORMAL,PNEUMONIA"
        )
        parser.add_argument("--positive", required=True, help="The label that is a finding.")
        parser.add_argument("--threshold", required=True, type=float, help="0 to 1")
        parser.add_argument("--onnx", required=True, type=Path, help="The exported ONNX file.")
        parser.add_argument(
            "--weights", required=True, type=Path, help="The state_dict, for Grad-CAM."
        )
        parser.add_argument(
            "--preprocessing",
            help="A PreprocessSpec as a JSON object or a JSON file; default: the task's standard.",
        )
        parser.add_argument("--card", type=Path, help="The model card, a JSON file.")
        parser.add_argument("--metrics", type=Path, help="Validation metrics, a JSON file.")
        parser.add_argument("--activate", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        name, version, task = options["name"], options["version"], Task(options["task"])
        architecture = options["architecture"]
        labels = _labels(options["labels"], options["positive"])
        threshold = options["threshold"]
        if not 0.0 <= threshold <= 1.0:
            raise CommandError(f"--threshold must be between 0 and 1, not {threshold:g}.")
        _require_architecture(architecture, task)
        for option in ("onnx", "weights"):
            if not options[option].is_file():
                raise CommandError(f"--{option}: no such file: {options[option]}")
        spec = _preprocessing(options["preprocessing"], task)
        card = _json_object_file(options["card"], "--card")
        metrics = _json_object_file(options["metrics"], "--metrics")
        # Checked before any file is copied: the copy would replace the registered version's.
        if ModelVersion.objects.filter(name=name, version=version).exists():
            raise CommandError(f"{name} {version} is registered already; give a new --version.")
        try:
            model_version = model_version_register(
                name=name,
                version=version,
                task=task,
                architecture=architecture,
                class_labels=labels,
                positive_label=options["positive"],
                threshold=threshold,
                preprocessing=spec.to_dict(),
                onnx_file=options["onnx"],
                weights_file=options["weights"],
                metrics=metrics,
                model_card=card,
            )
        except (ValueError, IntegrityError) as error:
            raise CommandError(f"Cannot register {name} {version}: {error}") from error
        self.stdout.write(
            f"Registered model version #{model_version.pk}: {name} {version} "
            f"({task}, {architecture}), {model_version.status}.\n"
            f"ONNX sha256:    {model_version.onnx_sha256}  {model_version.onnx_path}\n"
            f"weights sha256: {model_version.weights_sha256}  {model_version.weights_path}"
        )
        if options["activate"]:
            retired = activate(model_version=model_version, ensemble=False)
            self.stdout.write(describe_activation(model_version, retired))


def _labels(value: str, positive: str) -> list[str]:
    """The comma-separated labels, checked to be distinct, at least two, and hold ``positive``."""
    labels = [label.strip() for label in value.split(",") if label.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise CommandError(f"--labels needs two or more distinct labels, not {value!r}.")
    if positive not in labels:
        raise CommandError(f"--positive {positive!r} is not one of the labels {labels}.")
    return labels


def _require_architecture(architecture: str, task: Task) -> None:
    """CommandError unless the network reads the images of ``task`` (2D or 3D)."""
    # Imported here: it imports torch, which only this check needs.
    from inference.networks import input_dims

    if input_dims(architecture) != TASK_DIMS[task]:
        raise CommandError(
            f"--architecture {architecture} is {input_dims(architecture)}D; "
            f"{task.label} needs a {TASK_DIMS[task]}D network."
        )


def _preprocessing(value: str | None, task: Task) -> PreprocessSpec:
    """The spec given as a JSON object or file, else the task's default; checked for ``task``."""
    if value is None:
        return DEFAULT_PREPROCESSING[task]
    if value.lstrip().startswith("{"):
        data = _json_object(value, "--preprocessing")
    else:
        data = _json_object_file(Path(value), "--preprocessing")
    try:
        spec = PreprocessSpec.from_dict(data)
    except (ValueError, TypeError) as error:
        raise CommandError(f"--preprocessing is not a valid spec: {error}") from error
    if spec.dims != TASK_DIMS[task]:
        raise CommandError(
            f"--preprocessing has {spec.dims} dimensions; {task.label} needs {TASK_DIMS[task]}."
        )
    return spec


def _json_object_file(path: Path | None, option: str) -> dict[str, Any]:
    """The JSON object in the file at ``path`` (empty when no path was given)."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"{option}: cannot read {path}: {error}") from error
    return _json_object(text, f"{option} {path}")


def _json_object(text: str, where: str) -> dict[str, Any]:
    """``text`` parsed as JSON; CommandError unless it is an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{where}: invalid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CommandError(f"{where}: expected a JSON object, not {type(data).__name__}.")
    return data

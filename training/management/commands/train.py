"""``manage.py train TASK DATASET...``: train, test, export and register a candidate model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.management.commands.activate_model import activate, describe_activation
from inference.management.commands.register_model import DEFAULT_PREPROCESSING
from inference.models import ModelVersion, Task
from inference.preprocessing import PreprocessSpec
from training.datasets import DatasetError, load
from training.engine import FitConfig
from training.run import PARITY_TOLERANCE, RunOptions, TrainingError, train
from training.search import search

DEFAULT_ARCHITECTURE = {Task.CXR2D: "resnet18", Task.CT3D: "r3d_18"}


class Command(BaseCommand):
    help = (
        "Train a model on a labelled dataset (a folder per class, the RSNA layout, CT registry "
        "CSVs, or --from-reviews), test it, export it to ONNX (checked against torch) and "
        "register it as a candidate model version. Everything lands in a run folder."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        """Django's parser, in which --version names the model version (not Django's)."""
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task", choices=Task.values)
        parser.add_argument("dataset", nargs="*", type=Path, help="Folder, RSNA root or CSVs.")
        parser.add_argument("--from-reviews", action="store_true", help="Reviewed results.")
        parser.add_argument("--group-pattern", help="Regex naming an image's patient.")
        parser.add_argument("--split-file", type=Path, help="A split.csv of an earlier run.")
        parser.add_argument("--seed", type=int, default=42)
        parser.add_argument("--positive", help="The finding class (default per task).")
        parser.add_argument("--name", help="Model name (default: <task>-<architecture>).")
        parser.add_argument("--version", help="Model version (default: UTC date and time).")
        parser.add_argument("--architecture", choices=ModelVersion.Architecture.values)
        parser.add_argument("--size", help="Input size: 224 or 224,224 (2D); 96,192,192 (3D).")
        parser.add_argument("--epochs", type=int, default=FitConfig.epochs)
        parser.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
        parser.add_argument("--lr", type=float, default=FitConfig.lr)
        parser.add_argument("--weight-decay", type=float, default=FitConfig.weight_decay)
        parser.add_argument("--warmup-epochs", type=float, default=FitConfig.warmup_epochs)
        parser.add_argument("--patience", type=int, default=FitConfig.patience)
        parser.add_argument(
            "--balance", choices=("sampler", "weights", "none"), default=FitConfig.balance
        )
        parser.add_argument("--pretrained", type=Path, help="A local torchvision state_dict.")
        parser.add_argument(
            "--freeze-epochs", type=int, default=0, help="Train only the head for N epochs."
        )
        parser.add_argument("--resume", type=Path, help="A run's last.pt.")
        parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
        parser.add_argument("--workers", type=int, default=0, help="Data loader processes.")
        parser.add_argument("--cache", action="store_true", help="Keep inputs in memory.")
        parser.add_argument(
            "--letterbox-aspect",
            type=float,
            default=1.0,
            help="Also show squares squeezed up to this aspect and padded (e.g. 1.6).",
        )
        parser.add_argument(
            "--with-meta",
            action="store_true",
            help="Fuse PatientAge, PatientSex and ViewPosition into the head (cxr2d, DICOM).",
        )
        parser.add_argument("--target-recall", type=float, default=0.95)
        parser.add_argument(
            "--recall-confidence",
            type=float,
            default=0.95,
            help="Confidence that the threshold's recall reaches the target (0: as observed).",
        )
        parser.add_argument(
            "--search",
            type=int,
            default=0,
            metavar="N",
            help="First N Optuna trials over lr, weight decay and batch size (needs optuna).",
        )
        parser.add_argument("--output", type=Path, help="Run folder (default under data dir).")
        parser.add_argument("--no-register", action="store_true")
        parser.add_argument("--activate", action="store_true", help="Activate if registered.")

    def handle(self, *args: Any, **options: Any) -> None:
        task = Task(options["task"])
        architecture = options["architecture"] or DEFAULT_ARCHITECTURE[task]
        version = options["version"] or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = options["name"] or f"{task.value}-{architecture}"
        if ModelVersion.objects.filter(name=name, version=version).exists():
            raise CommandError(f"{name} {version} is registered already; give a new --version.")
        if not 0 < options["target_recall"] <= 1:
            raise CommandError("--target-recall must be in (0, 1].")
        if not 0 <= options["recall_confidence"] < 1:
            raise CommandError("--recall-confidence must be in [0, 1).")
        if options["search"] and options["resume"]:
            raise CommandError("--search starts fresh runs; it cannot --resume.")
        if options["resume"] and not options["resume"].is_file():
            raise CommandError(f"--resume: no such checkpoint: {options['resume']}")
        output = options["output"] or (
            options["resume"].parent
            if options["resume"]
            else Path(settings.PACS_AI_DATA_DIR) / "training-runs" / f"{name}-{version}"
        )
        spec = _spec(task, options["size"], metadata=options["with_meta"])
        try:
            dataset = load(
                options["dataset"],
                task=task,
                group_pattern=options["group_pattern"],
                from_reviews=options["from_reviews"],
            )
            self.stdout.write(f"{dataset.source}: {len(dataset.samples)} samples {dataset.counts}")
            run_options = RunOptions(
                task=task,
                name=name,
                version=version,
                architecture=architecture,
                output=output,
                spec=spec,
                fit=FitConfig(
                    epochs=options["epochs"],
                    batch_size=options["batch_size"],
                    lr=options["lr"],
                    weight_decay=options["weight_decay"],
                    warmup_epochs=options["warmup_epochs"],
                    patience=options["patience"],
                    balance=options["balance"],
                    freeze_epochs=options["freeze_epochs"],
                    workers=options["workers"],
                    precision=options["precision"],
                ),
                positive=options["positive"],
                seed=options["seed"],
                split_file=options["split_file"],
                target_recall=options["target_recall"],
                recall_confidence=options["recall_confidence"],
                pretrained=options["pretrained"],
                resume=options["resume"],
                cache=options["cache"],
                letterbox_aspect=options["letterbox_aspect"],
                device=options["device"],
                register=not options["no_register"],
            )
            if options["search"] > 0:
                run_options = search(dataset, run_options, options["search"])
                self.stdout.write(
                    f"Search: {options['search']} trials in {output / 'search.csv'}; best "
                    f"lr {run_options.fit.lr:.3g}, weight decay {run_options.fit.weight_decay:.3g}"
                    f", batch size {run_options.fit.batch_size}."
                )
            run = train(dataset, run_options)
        except (DatasetError, TrainingError, ValueError) as error:
            raise CommandError(str(error)) from error
        test = run.metrics["test"]
        self.stdout.write(
            f"Run folder: {output}\n"
            f"ONNX parity: max abs diff of logits {run.metrics['onnx_parity_max_abs_diff']:.3g} "
            f"(tolerance {PARITY_TOLERANCE:g})\n"
            f"Test ({test['n']}) at threshold {test['threshold']:.4f}: "
            + ", ".join(
                f"{key} {test[key]:.4f}"
                for key in (
                    "accuracy",
                    "precision",
                    "recall",
                    "specificity",
                    "f1",
                    "roc_auc",
                    "pr_auc",
                )
                if test[key] is not None
            )
            + f"\nconfusion (rows true, columns predicted): {test['confusion']}"
        )
        if run.model_version is not None:
            self.stdout.write(f"Registered {run.model_version} (#{run.model_version.pk}).")
            if options["activate"]:
                retired = activate(model_version=run.model_version, ensemble=False)
                self.stdout.write(describe_activation(run.model_version, retired))


def _spec(task: Task, size: str | None, *, metadata: bool) -> PreprocessSpec:
    """The task's standard spec, with ``size`` (one number: a square or cube) if given."""
    spec = DEFAULT_PREPROCESSING[task].to_dict()
    if size is not None:
        try:
            values = [int(part) for part in size.split(",")]
        except ValueError as error:
            raise CommandError(f"--size {size!r}: expected integers separated by commas") from error
        spec["size"] = values * spec["dims"] if len(values) == 1 else values
    try:
        return PreprocessSpec.from_dict({**spec, "metadata": metadata})
    except ValueError as error:
        raise CommandError(f"--size {size!r} / --with-meta: {error}") from error

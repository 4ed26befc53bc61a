"""``manage.py infer PATH...``: analyse files with the registered models, without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.management.commands.report import add_output_arguments, write_output
from inference.models import Mode
from inference.offline import files_infer
from inference.runners import RUNNERS, ModelIntegrityError

MODES = {"per-series": Mode.PER_SERIES, "per-slice": Mode.PER_SLICE}


class Command(BaseCommand):
    help = (
        "Analyse DICOM files, folders of studies, zip archives of studies or JPEG/PNG chest "
        "radiographs with the registered models (no worker or listener needed; nothing is "
        "stored) and write an Excel or JSON report. CT goes to the chest CT model, CR/DX and "
        "images to the chest X-ray model. Not for diagnostic use."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
        parser.add_argument(
            "--mode",
            choices=MODES,
            default="per-series",
            help="per-slice adds a row per CT slice and gives every image of a series its row.",
        )
        parser.add_argument(
            "--model",
            metavar="NAME[:VERSION]",
            help="Use this model version for its task instead of the active one(s).",
        )
        parser.add_argument(
            "--runner", choices=sorted(RUNNERS), help="Default: the INFERENCE_RUNNER setting."
        )
        add_output_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        missing = [str(path) for path in options["paths"] if not path.exists()]
        if missing:
            raise CommandError(f"No such file or folder: {', '.join(missing)}")
        try:
            rows = files_infer(
                paths=options["paths"],
                mode=MODES[options["mode"]],
                model=options["model"],
                runner=options["runner"],
                progress=options["verbosity"] > 0,
            )
        except (LookupError, ModelIntegrityError) as error:
            raise CommandError(str(error)) from error
        write_output(self, rows, options)

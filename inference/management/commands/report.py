"""``manage.py report``: an Excel or JSON report of the AI results in the database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.models import Prediction
from inference.reports import (
    FAILURE,
    FORMATS,
    ReportRow,
    render,
    report_predictions,
    rows_from_predictions,
)


def add_output_arguments(parser: CommandParser) -> None:
    """``--format`` and ``--out``, as ``report`` and ``infer`` both take them."""
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="Default: json when --out ends in .json or is absent, else xlsx.",
    )
    parser.add_argument(
        "--out", type=Path, help="The file to write; without it, JSON goes to standard output."
    )


def write_output(command: BaseCommand, rows: list[ReportRow], options: dict[str, Any]) -> None:
    """Write the report of ``rows`` where ``--out`` and ``--format`` say, then summarise it.

    The summary goes to standard error when the JSON itself went to standard output.
    """
    out: Path | None = options["out"]
    fmt = options["format"] or ("xlsx" if out and out.suffix.lower() != ".json" else "json")
    if fmt == "xlsx" and out is None:
        raise CommandError("--format xlsx needs --out FILE.")
    data = render(rows, fmt=fmt)
    series = [row for row in rows if row.slice_index is None]
    failed = sum(row.processing_status == FAILURE for row in series)
    summary = f"{len(series)} results ({len(series) - failed} succeeded, {failed} failed)"
    if out is None:
        command.stdout.write(data.decode(), ending="")
        command.stderr.write(summary + ".")
        return
    try:
        out.write_bytes(data)
    except OSError as error:
        raise CommandError(f"Cannot write {out}: {error}") from error
    command.stdout.write(f"Wrote {summary} to {out}.")


class Command(BaseCommand):
    help = (
        "Write a report of the AI results in the database: an Excel workbook (one row per "
        "series, a per-slice sheet, the models and their sha256) or JSON. Superseded results "
        "are left out unless --include-superseded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since", type=dt.date.fromisoformat, help="Results made on or after YYYY-MM-DD."
        )
        parser.add_argument(
            "--until", type=dt.date.fromisoformat, help="Results made on or before YYYY-MM-DD."
        )
        parser.add_argument("--modality", help="The series' modality, e.g. CT or CR.")
        parser.add_argument("--label", help="The predicted label, e.g. PNEUMONIA.")
        parser.add_argument(
            "--status",
            choices=Prediction.Status.values,
            help="analysed (reported as Success) or not_analysed (Failure).",
        )
        parser.add_argument(
            "--include-superseded",
            action="store_true",
            help="Also the older results of series that were analysed again.",
        )
        add_output_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        predictions = report_predictions(
            since=options["since"],
            until=options["until"],
            modality=options["modality"],
            label=options["label"],
            status=options["status"],
            include_superseded=options["include_superseded"],
        )
        write_output(self, rows_from_predictions(predictions), options)

"""``manage.py bench_ingest``: how fast the listener stores what a PACS sends, next to DCMTK."""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies import bench

# Our instances/s over DCMTK's, by workload. Ours fsyncs and indexes every instance; storescp
# does neither.
TARGETS = {"CT": 0.30, "DX": 0.70}


@dataclass
class Run:
    round: int
    workload: str
    receiver: str
    seconds: float
    instances: int
    nbytes: int

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.nbytes / 1e6 / self.seconds


class Command(BaseCommand):
    help = (
        "Benchmark DICOM ingest. Sends a synthetic CT series, DX images, and the CT series again "
        "over N concurrent associations with storescu to DCMTK's storescp +B and to our listener "
        "(its own process, data directory and, in embedded mode, SQLite database), alternating "
        "who goes first over several rounds; checks every instance arrived exactly once; prints "
        "instances/s and MB/s (10^6 bytes) and ours/DCMTK against the targets."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--ct-slices", type=int, default=300, help="512x512 CT slices")
        parser.add_argument("--dx-images", type=int, default=100, help="2048x2048 DX images")
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("--associations", type=int, default=4, help="for the CT xN workload")

    def handle(self, *args: Any, **options: Any) -> None:
        if not bench.dcmtk_installed():
            raise CommandError("DCMTK is not installed (apt-get install dcmtk)")
        tag = f"B{secrets.token_hex(3).upper()}"  # marks this run's patients and accessions
        rng = np.random.default_rng()
        runs: list[Run] = []
        with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as tmp:
            folder = Path(tmp)
            dcmtk, ours = bench.StoreScp(folder), bench.PacsAiListener(folder)
            floor = bench.DiskFloor(folder)
            engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
            self.stdout.write(
                f"{os.cpu_count()} CPUs, temp folder {folder}. Ours: fsync, {engine}"
                f"{' (fresh)' if settings.EMBEDDED else ''}. DCMTK: storescp +B, no fsync."
            )
            try:
                dcmtk.start()
                ours.start()
                self.stdout.write(
                    f"{'round':>5}  {'workload':<8} {'receiver':<8} {'instances':>9} {'MB':>8} "
                    f"{'s':>8} {'inst/s':>8} {'MB/s':>8}"
                )
                for number in range(1, options["rounds"] + 1):
                    source = folder / f"source-{number}"
                    source.mkdir()
                    # Alternate who goes first, so neither always meets a warmer or busier disk.
                    receivers: list[bench.Receiver] = [dcmtk, ours] if number % 2 else [ours, dcmtk]
                    for workload in self._workloads(source, f"{tag}-{number}", rng, options):
                        for receiver in receivers:
                            runs.append(self._run(number, workload, receiver, folder))
                        if len(workload.batches) == 1:
                            runs.append(self._floor(number, workload, floor))
                    shutil.rmtree(source)
            finally:
                ours.stop()
                dcmtk.stop()
                if not settings.EMBEDDED:
                    ours.forget(tag)
        self._write_summary(runs)

    def _workloads(
        self, source: Path, tag: str, rng: np.random.Generator, options: dict[str, Any]
    ) -> list[bench.Workload]:
        slices, associations = options["ct_slices"], options["associations"]
        return [
            bench.ct_series(
                source, name="CT", accession=f"{tag}-CT", slices=slices, batches=1, rng=rng
            ),
            bench.dx_images(
                source, name="DX", accession=f"{tag}-DX", images=options["dx_images"], rng=rng
            ),
            bench.ct_series(
                source,
                name=f"CT x{associations}",
                accession=f"{tag}-CTN",
                slices=slices,
                batches=associations,
                rng=rng,
            ),
        ]

    def _run(
        self, number: int, workload: bench.Workload, receiver: bench.Receiver, folder: Path
    ) -> Run:
        """Send one workload to one receiver, check what it stored, and print the figures."""
        # Write back earlier runs' data now, so that it is not charged to this run.
        os.sync()
        seconds = bench.send(
            port=receiver.port,
            ae_title=receiver.ae_title,
            workload=workload,
            log=folder / "storescu",
        )
        receiver.verify(workload)
        return self._report(
            Run(number, workload.name, receiver.name, seconds, workload.count, workload.nbytes)
        )

    def _floor(self, number: int, workload: bench.Workload, floor: bench.DiskFloor) -> Run:
        os.sync()
        seconds = floor.copy(workload)
        return self._report(
            Run(number, workload.name, floor.name, seconds, workload.count, workload.nbytes)
        )

    def _report(self, run: Run) -> Run:
        self.stdout.write(
            f"{run.round:>5}  {run.workload:<8} {run.receiver:<8} {run.instances:>9} "
            f"{run.nbytes / 1e6:>8.1f} {run.seconds:>8.2f} {run.per_second:>8.1f} "
            f"{run.mb_per_second:>8.1f}"
        )
        return run

    def _write_summary(self, runs: list[Run]) -> None:
        """Per workload: median figures per receiver; ours/DCMTK per round as min/median/max.

        A target counts as met when the median ratio reaches it. Then, where it was measured,
        the durable floor against both: how much of the gap to DCMTK is the disk's.
        """
        self.stdout.write(
            f"\n{'workload':<8} {'DCMTK inst/s':>12} {'MB/s':>7} {'ours inst/s':>12} {'MB/s':>7}"
            f"  {'ours/DCMTK min / median / max':<29}  target"
        )
        for workload in dict.fromkeys(run.workload for run in runs):
            theirs = self._by_round(runs, workload, bench.StoreScp.name)
            ours = self._by_round(runs, workload, bench.PacsAiListener.name)
            ratios = self._ratios(theirs, ours)
            target = TARGETS.get(workload)
            verdict = "-"
            if target is not None:
                met = statistics.median(ratios) >= target
                verdict = f">= {target:.2f}: {'met' if met else 'NOT met'}"
            self.stdout.write(
                f"{workload:<8} {self._medians(theirs)} {self._medians(ours)}  "
                f"{self._spread(ratios):<29}  {verdict}"
            )
        floors = {
            workload: floor
            for workload in dict.fromkeys(run.workload for run in runs)
            if (floor := self._by_round(runs, workload, bench.DiskFloor.name))
        }
        if not floors:
            return
        self.stdout.write(
            f"\n{'workload':<8} {'floor inst/s':>12} {'MB/s':>7}  "
            f"{'floor/DCMTK min / median / max':<30}  ours/floor min / median / max"
        )
        for workload, floor in floors.items():
            theirs = self._by_round(runs, workload, bench.StoreScp.name)
            ours = self._by_round(runs, workload, bench.PacsAiListener.name)
            self.stdout.write(
                f"{workload:<8} {self._medians(floor)}  "
                f"{self._spread(self._ratios(theirs, floor)):<30}  "
                f"{self._spread(self._ratios(floor, ours))}"
            )

    @staticmethod
    def _medians(by_round: dict[int, Run]) -> str:
        per_second = statistics.median(r.per_second for r in by_round.values())
        mb_per_second = statistics.median(r.mb_per_second for r in by_round.values())
        return f"{per_second:>12.1f} {mb_per_second:>7.1f}"

    @staticmethod
    def _ratios(reference: dict[int, Run], measured: dict[int, Run]) -> list[float]:
        """Per round, the reference's time over the measured one's: the throughput ratio."""
        return sorted(reference[n].seconds / measured[n].seconds for n in measured)

    @staticmethod
    def _spread(ratios: list[float]) -> str:
        return f"{ratios[0]:.3f} / {statistics.median(ratios):.3f} / {ratios[-1]:.3f}"

    @staticmethod
    def _by_round(runs: list[Run], workload: str, receiver: str) -> dict[int, Run]:
        return {r.round: r for r in runs if r.workload == workload and r.receiver == receiver}

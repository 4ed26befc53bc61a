"""``manage.py bench_inference``: the worker path next to raw ONNX Runtime on the same inputs."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference import bench, preprocessing
from inference.models import Mode, ModelVersion, Task
from inference.runners.onnx import providers
from studies.models import Series

MANAGE_PY = Path(settings.BASE_DIR) / "manage.py"
# X-rays: worker images/s over raw ORT's, batched. CT: worker seconds per series over raw ORT's
# forward plus pydicom decoding the slices. Peak RSS of a worker running one CT job, bytes.
XRAY_BATCHED_MIN_RATIO = 0.70
CT_MAX_RATIO = 1.30
CT_MAX_PEAK_RSS = 2_000_000_000


@dataclass
class Case:
    """One workload, run both ways: ``raw`` directly, the worker on jobs ``create`` makes.

    X-ray cases compare throughput (worker images/s over raw ORT's, at least ``min_ratio``);
    ``per_series`` cases compare time (worker seconds over raw ORT's, at most ``max_ratio``).
    """

    name: str
    items: int
    raw: Callable[[], object]
    create: Callable[[], list[int]]
    expected: bench.Array
    per_series: bool = False
    min_ratio: float | None = None
    max_ratio: float | None = None


@dataclass
class Run:
    round: int
    case: Case
    path: str
    seconds: float
    stages: dict[str, float]  # the worker's, from its predictions' timings


class Command(BaseCommand):
    help = (
        "Benchmark inference on this host: raw ONNX Runtime on prepared tensors against the "
        "worker path (job_run: decode, preprocess, infer, store predictions; no heatmaps) on "
        "synthetic DX images one at a time and batched from one series, and one CT series. "
        "Runs in a throwaway installation (a fresh data directory, SQLite database and queue in "
        "a temporary folder; random-weight resnet18 and r3d_18 built here), alternates which "
        "path goes first over several rounds, checks both give the same probabilities, and "
        "prints throughput, worker/raw min/median/max, and peak worker RSS against the targets."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--xrays", type=int, default=32, help="DX images per X-ray case")
        parser.add_argument("--xray-size", type=int, default=2048, help="DX rows = columns")
        parser.add_argument("--ct-slices", type=int, default=300, help="512x512 CT slices")
        parser.add_argument("--rounds", type=int, default=5)
        # Set by the command when it starts itself inside the throwaway installation.
        parser.add_argument("--sandbox", type=Path, help=argparse.SUPPRESS)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["sandbox"] is None:
            self._launch(options)
        else:
            self._bench(options["sandbox"], options)

    def _launch(self, options: dict[str, Any]) -> None:
        """Run this command again in a fresh installation in a temporary folder, relaying its
        output; nothing of this host's configured database, queue or storage is touched."""
        with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-inference-") as tmp:
            folder = Path(tmp)
            (folder / bench.SANDBOX_MARK).touch()
            log = folder / "stderr.log"
            command = [sys.executable, str(MANAGE_PY), "bench_inference", "--sandbox", tmp]
            for name in ("xrays", "xray_size", "ct_slices", "rounds"):
                command += [f"--{name.replace('_', '-')}", str(options[name])]
            with log.open("wb") as errors:
                process = subprocess.Popen(
                    command,
                    env=bench.sandbox_env(folder),
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    text=True,
                )
                assert process.stdout is not None
                for line in process.stdout:
                    self.stdout.write(line.rstrip("\n"))
                code = process.wait()
            if code != 0:
                raise CommandError(f"benchmark failed ({code}): {log.read_text()[-3000:]}")

    def _bench(self, folder: Path, options: dict[str, Any]) -> None:
        bench.require_sandbox(folder)
        call_command("migrate", interactive=False, verbosity=0)
        xrays, rounds = options["xrays"], options["rounds"]
        build = folder / "build"
        build.mkdir()
        self.stdout.write(
            f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__} {'/'.join(providers())}"
            f", throwaway installation in {folder} (SQLite). Heatmaps off "
            f"(INFERENCE_GRADCAM={settings.INFERENCE_GRADCAM}). Random weights. {_load()}."
        )
        xray_model = bench.model_register(
            task=Task.CXR2D, spec=preprocessing.CHEST_XRAY, folder=build
        )
        ct_model = bench.model_register(task=Task.CT3D, spec=preprocessing.CHEST_CT, folder=build)
        rng = np.random.default_rng(0)
        size = options["xray_size"]
        singles = bench.dx_series(images=xrays, per_series=1, size=size, rng=rng, tag="ONE")
        (batched,) = bench.dx_series(images=xrays, per_series=xrays, size=size, rng=rng, tag="ALL")
        ct = bench.ct_series(slices=options["ct_slices"], size=512, rng=rng, tag="CT")
        cases = self._cases(xray_model, ct_model, singles, batched, ct)
        self.stdout.write(
            f"Models: resnet18 {preprocessing.CHEST_XRAY.size}, r3d_18 "
            f"{preprocessing.CHEST_CT.size}. Inputs: {xrays} + {xrays} DX {size}x{size} 16-bit, "
            f"CT {options['ct_slices']} slices 512x512 16-bit, stored with instance_store. "
            "Each case run once both ways first (not counted: loads the models)."
        )
        for case in cases:
            _raw(case)
            _worker(case)
        self.stdout.write(
            f"\n{'round':>5}  {'case':<22} {'path':<8} {'items':>5} {'s':>8} {'items/s':>8}"
        )
        runs: list[Run] = []
        for number in range(1, rounds + 1):
            for case in cases:
                # Alternate who goes first, so neither always runs on a warmer or busier machine.
                paths = list(PATHS) if number % 2 else list(reversed(PATHS))
                for path in paths:
                    runs.append(self._record(number, case, path))
        self.stdout.write(f"{_load()}.")
        self._write_summary(cases, runs)
        self._write_stages(cases, runs)
        self._write_peak_rss(ct, cases[-1].expected)

    def _cases(
        self,
        xray_model: ModelVersion,
        ct_model: ModelVersion,
        singles: list[Series],
        batched: Series,
        ct: Series,
    ) -> list[Case]:
        """The three workloads, with their prepared inputs and raw ORT's probabilities."""
        xray_raw, ct_raw = bench.RawOrt(xray_model), bench.RawOrt(ct_model)
        one_by_one = bench.radiograph_inputs(singles, preprocessing.CHEST_XRAY)
        together = bench.radiograph_inputs([batched], preprocessing.CHEST_XRAY)
        ct_paths = bench.series_paths(ct)
        volume = preprocessing.ct_volume(ct_paths, preprocessing.CHEST_CT).pixels[None]
        return [
            Case(
                name="X-ray one at a time",
                items=len(one_by_one),
                raw=lambda: [xray_raw.logits(one[None]) for one in one_by_one],
                create=lambda: bench.jobs_create(singles, task=Task.CXR2D, mode=Mode.PER_SERIES),
                expected=bench.positive_probabilities(xray_raw.logits(one_by_one)),
            ),
            Case(
                name=f"X-ray batched x{len(together)}",
                items=len(together),
                raw=lambda: xray_raw.logits(together),
                create=lambda: bench.jobs_create([batched], task=Task.CXR2D, mode=Mode.PER_SLICE),
                expected=bench.positive_probabilities(xray_raw.logits(together)),
                min_ratio=XRAY_BATCHED_MIN_RATIO,
            ),
            Case(
                name=f"CT {len(ct_paths)} slices",
                items=1,
                raw=lambda: (bench.decode_slices(ct_paths), ct_raw.logits(volume)),
                create=lambda: bench.jobs_create([ct], task=Task.CT3D, mode=Mode.PER_SERIES),
                expected=bench.positive_probabilities(ct_raw.logits(volume)),
                per_series=True,
                max_ratio=CT_MAX_RATIO,
            ),
        ]

    def _record(self, number: int, case: Case, path: str) -> Run:
        run = Run(number, case, path, *PATHS[path](case))
        self.stdout.write(
            f"{number:>5}  {case.name:<22} {path:<8} {case.items:>5} {run.seconds:>8.3f} "
            f"{case.items / run.seconds:>8.2f}"
        )
        return run

    def _write_summary(self, cases: list[Case], runs: list[Run]) -> None:
        """Per case: median figures per path; worker against raw per round as min/median/max.

        A target counts as met when the median ratio meets it.
        """
        self.stdout.write(
            f"\n{'case':<22} {'raw ORT':>16} {'worker':>16}  "
            f"{'worker/raw min / median / max':<34}  target"
        )
        for case in cases:
            raw = {r.round: r.seconds for r in runs if r.case is case and r.path == "raw ORT"}
            worker = {r.round: r.seconds for r in runs if r.case is case and r.path == "worker"}
            if case.per_series:
                ratios = sorted(worker[n] / raw[n] for n in raw)
                figures = [f"{statistics.median(s.values()):.3f} s/series" for s in (raw, worker)]
                kind = "time"
            else:
                ratios = sorted(raw[n] / worker[n] for n in raw)
                figures = [
                    f"{case.items / statistics.median(s.values()):.2f} images/s"
                    for s in (raw, worker)
                ]
                kind = "throughput"
            median = statistics.median(ratios)
            if case.min_ratio is not None:
                verdict = f">= {case.min_ratio:.2f}: {_met(median >= case.min_ratio)}"
            elif case.max_ratio is not None:
                verdict = f"<= {case.max_ratio:.2f}: {_met(median <= case.max_ratio)}"
            else:
                verdict = "-"
            spread = f"{kind} {ratios[0]:.3f} / {median:.3f} / {ratios[-1]:.3f}"
            self.stdout.write(
                f"{case.name:<22} {figures[0]:>16} {figures[1]:>16}  {spread:<34}  {verdict}"
            )

    def _write_stages(self, cases: list[Case], runs: list[Run]) -> None:
        """Where the worker's time goes: the median per stage over the rounds; ``rest`` is the
        time outside the stages (claiming the job, queries, writing the predictions)."""
        self.stdout.write("\nWorker stages, median seconds per run (the jobs' own timings):")
        for case in cases:
            worker = [r for r in runs if r.case is case and r.path == "worker"]
            names = list(dict.fromkeys(name for r in worker for name in r.stages))
            medians = {
                **{
                    name: statistics.median(r.stages.get(name, 0.0) for r in worker)
                    for name in names
                },
                "rest": statistics.median(r.seconds - sum(r.stages.values()) for r in worker),
            }
            figures = "  ".join(f"{name} {seconds:.3f}" for name, seconds in medians.items())
            self.stdout.write(f"{case.name:<22} {figures}")

    def _write_peak_rss(self, ct: Series, expected: bench.Array) -> None:
        """Peak RSS of a fresh worker process that runs one CT job, against the target."""
        (job_id,) = bench.jobs_create([ct], task=Task.CT3D, mode=Mode.PER_SERIES)
        peak = bench.peak_rss(job_id)
        bench.jobs_check([job_id], expected)
        self.stdout.write(
            f"\nPeak RSS (VmHWM) of a fresh process running one CT job: "
            f"{peak.after_job / 1e6:.0f} MB ({peak.after_imports / 1e6:.0f} MB after its imports, "
            f"before the job). Target <= {CT_MAX_PEAK_RSS / 1e6:.0f} MB: "
            f"{_met(peak.after_job <= CT_MAX_PEAK_RSS)}"
        )


def _raw(case: Case) -> tuple[float, dict[str, float]]:
    """Seconds raw ONNX Runtime takes on the case's prepared inputs (no stages)."""
    return bench.timed(case.raw), {}


def _worker(case: Case) -> tuple[float, dict[str, float]]:
    """Seconds the worker takes on freshly queued jobs, and its stages; the predictions are
    checked against raw ORT's."""
    job_ids = case.create()
    seconds = bench.timed(lambda: bench.jobs_run(job_ids))
    bench.jobs_check(job_ids, case.expected)
    return seconds, bench.jobs_stages(job_ids)


PATHS: dict[str, Callable[[Case], tuple[float, dict[str, float]]]] = {
    "raw ORT": _raw,
    "worker": _worker,
}


def _load() -> str:
    """This host's load averages: other processes on it skew every figure."""
    one, five, fifteen = os.getloadavg()
    return f"Load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def _met(met: bool) -> str:
    return "met" if met else "NOT met"

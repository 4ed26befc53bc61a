"""Running one inference job: quality gate, preprocessing, model, Grad-CAM, prediction rows.

Only workers import this module (it loads numpy-heavy code, and torch for Grad-CAM). The job
is claimed with a conditional UPDATE and its predictions are written in one transaction that
also marks it succeeded, conditional on this attempt still owning it: a job delivered twice,
or re-sent after its worker died, ends with exactly one set of predictions.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from inference import explain, preprocessing
from inference.export import export_enqueue
from inference.models import InferenceJob, Mode, ModelVersion, Prediction, Task
from inference.preprocessing import NotAnalysable, PreprocessSpec
from inference.runners import runner_for
from inference.selectors import active_models
from inference.services import job_claim
from studies.models import Instance
from studies.storage import storage_root

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
_VOLUME_BUFFER = preprocessing.VolumeBuffer()


class JobLost(Exception):
    """This attempt no longer owns the job (it was re-sent and another worker took it)."""


@dataclass
class Draft:
    """A prediction before it is written."""

    status: str
    instance: Instance | None = None
    slice_index: int | None = None
    reason: str = ""
    label: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    probability: float | None = None
    threshold: float | None = None
    heatmap_path: str = ""
    boxes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Ensemble:
    """One model, or several active ones whose probabilities are averaged by weight."""

    members: list[ModelVersion]
    # "onnx" or "torch": which of each member's files computes the probabilities.
    runner: str = field(default_factory=lambda: settings.INFERENCE_RUNNER)

    @property
    def lead(self) -> ModelVersion:
        """The model whose spec, labels and weights (for Grad-CAM) stand for the ensemble."""
        return max(self.members, key=lambda member: member.ensemble_weight)

    @property
    def name(self) -> str:
        return "+".join(member.name for member in self.members)

    @property
    def version(self) -> str:
        return "+".join(member.version for member in self.members)

    @property
    def sha256(self) -> str:
        """The sha256 of each member's file that computed the probabilities."""
        onnx = self.runner == "onnx"
        return ",".join(m.onnx_sha256 if onnx else m.weights_sha256 for m in self.members)

    @property
    def threshold(self) -> float:
        total = sum(member.ensemble_weight for member in self.members)
        return sum(m.threshold * m.ensemble_weight for m in self.members) / total

    def probabilities(self, batch: Array, metadata: Array | None = None) -> Array:
        """Class probabilities [N, classes], the weighted mean of the members' softmax.

        ``metadata`` [N, features] goes to the members that fuse it (see
        :func:`preprocessing.metadata_features`); the others read the images only.
        """
        total = sum(member.ensemble_weight for member in self.members)
        mixed = np.zeros((len(batch), len(self.lead.class_labels)), np.float32)
        for member in self.members:
            fused = uses_metadata(member)
            if fused and metadata is None:
                raise ValueError(f"{member.name} {member.version} needs the images' metadata")
            runner = runner_for(model_version=member, kind=self.runner)
            logits = runner.logits(batch, metadata if fused else None)
            mixed += _softmax(logits) * np.float32(member.ensemble_weight / total)
        return mixed


def uses_metadata(model_version: ModelVersion) -> bool:
    """Whether the model's head also reads DICOM metadata (trained with --with-meta)."""
    return bool(model_version.preprocessing.get("metadata"))


def job_run(*, job_id: int) -> InferenceJob | None:
    """Run a queued job to its predictions; None when another delivery already took it.

    Raises on failure with the job handed back (queued again for a retry, or failed on the
    last attempt: see ``job_release``).
    """
    job = job_claim(job_id=job_id)
    if job is None:
        logger.info("job %s: already taken by another delivery", job_id)
        return None
    attempt = job.attempts
    timings: dict[str, float] = {}
    drafts, ensemble = _analyse(job, timings)
    _finish(job=job, attempt=attempt, drafts=drafts, ensemble=ensemble, timings=timings)
    job.refresh_from_db()
    return job


def job_release(*, job_id: int, attempt: int, error: str, final: bool) -> None:
    """Hand a job back after an error: queued again for a retry, or failed on the last try."""
    status = InferenceJob.Status.FAILED if final else InferenceJob.Status.QUEUED
    InferenceJob.objects.filter(
        pk=job_id, status=InferenceJob.Status.RUNNING, attempts=attempt
    ).update(
        status=status,
        error=error[:2000],
        queued_at=timezone.now(),
        finished_at=timezone.now() if final else None,
    )


def _analyse(job: InferenceJob, timings: dict[str, float]) -> tuple[list[Draft], Ensemble | None]:
    members = [job.requested_model] if job.requested_model else list(active_models(task=job.task))
    if not members:
        reason = f"No active model for {Task(job.task).label}; an administrator must activate one."
        return [Draft(status=Prediction.Status.NOT_ANALYSED, reason=reason)], None
    ensemble = Ensemble(members=members)
    with _timed(timings, "load"):
        for member in members:
            runner_for(model_version=member, kind=ensemble.runner)
    spec = PreprocessSpec.from_dict(ensemble.lead.preprocessing)
    instances = list(
        job.series.instances.order_by("instance_number", "pk").only(
            "pk", "sop_instance_uid", "file_path", "series_id"
        )
    )
    minimum = job.routing_rule.min_instances if job.routing_rule else 0
    try:
        if len(instances) < minimum:
            raise NotAnalysable(
                f"Too few images: {len(instances)}, this analysis needs at least {minimum}.",
                code="too_few_slices",
            )
        if job.task == Task.CT3D:
            return _analyse_ct(job, ensemble, spec, instances, timings), ensemble
        return _analyse_radiographs(job, ensemble, spec, instances, timings), ensemble
    except NotAnalysable as exc:
        return [Draft(status=Prediction.Status.NOT_ANALYSED, reason=exc.reason)], ensemble


def _analyse_radiographs(
    job: InferenceJob,
    ensemble: Ensemble,
    spec: PreprocessSpec,
    instances: list[Instance],
    timings: dict[str, float],
) -> list[Draft]:
    """One prediction per image (per-slice mode) or the series' most positive image."""
    inputs: list[Array] = []
    shapes: list[tuple[int, int]] = []
    features: list[Array] = []
    readable: list[Instance] = []
    drafts: dict[int, Draft] = {}
    with _timed(timings, "preprocess"):
        results = list(_preprocess_pool().map(lambda one: _radiograph_input(one, spec), instances))
    for instance, result in zip(instances, results, strict=True):
        if isinstance(result, NotAnalysable):
            drafts[instance.pk] = Draft(
                status=Prediction.Status.NOT_ANALYSED, instance=instance, reason=result.reason
            )
        else:
            inputs.append(result[0])
            shapes.append(result[1])
            features.append(result[2])
            readable.append(instance)
    if readable:
        batch = np.stack(inputs)
        with _timed(timings, "infer"):
            probabilities = ensemble.probabilities(batch, np.stack(features))
        for row, instance in enumerate(readable):
            drafts[instance.pk] = draft_from_probabilities(
                ensemble, probabilities[row], instance=instance
            )
    ordered = [drafts[instance.pk] for instance in instances]
    if job.mode == Mode.PER_SERIES:
        analysed = [draft for draft in ordered if draft.status == Prediction.Status.ANALYSED]
        ordered = [max(analysed, key=lambda d: d.probability or 0.0)] if analysed else ordered[:1]
    with _timed(timings, "explain"):
        for draft in ordered:
            if draft.instance is not None and _wants_heatmap(draft, ensemble):
                row = readable.index(draft.instance)
                _explain_radiograph(
                    job, ensemble, spec, draft, inputs[row], shapes[row], features[row]
                )
    return ordered


def _radiograph_input(
    instance: Instance, spec: PreprocessSpec
) -> tuple[Array, tuple[int, int], Array] | NotAnalysable:
    """A stored radiograph's model input, (rows, columns) and metadata features, or why it may
    not be analysed."""
    try:
        dataset = preprocessing.dicom_header(storage_root() / instance.file_path)
        preprocessing.check_radiograph(dataset, spec)
        model_input = preprocessing.radiograph_from_dataset(dataset, spec)
    except NotAnalysable as exc:
        return exc
    shape = (int(dataset.Rows), int(dataset.Columns))
    return model_input, shape, preprocessing.metadata_features(dataset)


@functools.cache
def _preprocess_pool() -> ThreadPoolExecutor:
    """Threads that read and preprocess radiographs, kept for the life of the worker process.

    Decoding and resizing release the GIL, so the images of a series are read in parallel, one
    thread per core this worker may use (ORT_INTRA_OP_THREADS when set). Single images go
    through the pool too: a long-lived thread's malloc arena keeps the large buffers of a
    2048x2048 image for the next one, whereas on the main thread, depending on what the
    process allocated before, glibc may hand them back to the kernel after every image and
    fault them in again (4,600 to 7,600 page faults an image, roughly doubling its time).
    """
    cores = settings.ORT_INTRA_OP_THREADS or os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=cores, thread_name_prefix="preprocess")


# A forked child (a Celery prefork worker) has none of its parent's threads: it makes its own.
os.register_at_fork(after_in_child=_preprocess_pool.cache_clear)


def _analyse_ct(
    job: InferenceJob,
    ensemble: Ensemble,
    spec: PreprocessSpec,
    instances: list[Instance],
    timings: dict[str, float],
) -> list[Draft]:
    """One prediction for the volume, plus one per slice in per-slice mode."""
    paths = [storage_root() / instance.file_path for instance in instances]
    with _timed(timings, "preprocess"):
        preprocessing.check_ct_series(paths, spec)
        volume = preprocessing.ct_volume(paths, spec, buffer=_VOLUME_BUFFER)
    batch = volume.pixels[None]
    with _timed(timings, "infer"):
        probabilities = ensemble.probabilities(batch)
    series_draft = draft_from_probabilities(ensemble, probabilities[0])
    drafts = [series_draft]
    if job.mode == Mode.PER_SLICE:
        by_uid = {instance.sop_instance_uid: instance for instance in instances}
        with _timed(timings, "infer_slices"):
            per_slice = per_slice_probabilities(ensemble, batch, len(volume.slice_uids))
        for index, (uid, row) in enumerate(zip(volume.slice_uids, per_slice, strict=True)):
            drafts.append(
                draft_from_probabilities(ensemble, row, instance=by_uid.get(uid), slice_index=index)
            )
    if _wants_heatmap(series_draft, ensemble):
        with _timed(timings, "explain"):
            _explain_volume(job, ensemble, series_draft, batch)
    return drafts


def per_slice_probabilities(ensemble: Ensemble, batch: Array, num_slices: int) -> Array:
    import torch

    from inference.networks import per_slice_logits

    lead = ensemble.lead
    runner = runner_for(model_version=lead, kind="torch")
    with torch.inference_mode():
        logits = per_slice_logits(
            runner.model,  # type: ignore[attr-defined]
            torch.from_numpy(batch),
            architecture=lead.architecture,
            num_slices=num_slices,
        )
    return _softmax(logits[0].float().numpy())


def draft_from_probabilities(
    ensemble: Ensemble,
    probabilities: Array,
    *,
    instance: Instance | None = None,
    slice_index: int | None = None,
) -> Draft:
    labels: list[str] = ensemble.lead.class_labels
    positive = ensemble.lead.positive_label
    by_label = {label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)}
    threshold = ensemble.threshold
    if by_label[positive] >= threshold:
        label = positive
    else:
        label = max((other for other in labels if other != positive), key=by_label.__getitem__)
    return Draft(
        status=Prediction.Status.ANALYSED,
        instance=instance,
        slice_index=slice_index,
        label=label,
        probabilities=by_label,
        probability=by_label[positive],
        threshold=threshold,
    )


def _wants_heatmap(draft: Draft, ensemble: Ensemble) -> bool:
    """Grad-CAM per INFERENCE_GRADCAM: always, for positive findings only, or never here."""
    if draft.status != Prediction.Status.ANALYSED:
        return False
    policy = settings.INFERENCE_GRADCAM
    return policy == "always" or (
        policy == "positives" and draft.label == ensemble.lead.positive_label
    )


def _explain_radiograph(
    job: InferenceJob,
    ensemble: Ensemble,
    spec: PreprocessSpec,
    draft: Draft,
    model_input: Array,
    shape: tuple[int, int],
    features: Array,
) -> None:
    lead = ensemble.lead
    model = runner_for(model_version=lead, kind="torch").model  # type: ignore[attr-defined]
    positive = lead.class_labels.index(lead.positive_label)
    metadata = features[None] if uses_metadata(lead) else None
    heat = explain.gradcam(model, lead.architecture, model_input[None], positive, metadata)[0]
    image = model_input[0] * np.float32(spec.std) + np.float32(spec.mean)
    assert draft.instance is not None
    relative = _output_folder(job) / f"{draft.instance.sop_instance_uid}.png"
    explain.save_png(explain.overlay(image, heat), _outputs() / relative)
    draft.heatmap_path = str(relative)
    draft.boxes = [_to_image_pixels(box, spec.size, shape) for box in explain.boxes(heat)]


def _explain_volume(job: InferenceJob, ensemble: Ensemble, draft: Draft, batch: Array) -> None:
    lead = ensemble.lead
    spec = PreprocessSpec.from_dict(lead.preprocessing)
    model = runner_for(model_version=lead, kind="torch").model  # type: ignore[attr-defined]
    positive = lead.class_labels.index(lead.positive_label)
    heat = explain.gradcam(model, lead.architecture, batch, positive)[0]
    volume = batch[0, 0] * np.float32(spec.std) + np.float32(spec.mean)
    folder = _output_folder(job)
    np.save(_outputs() / folder / "heatmap.npy", heat.astype(np.float16))
    tiles = []
    for index in explain.salient_slices(heat, settings.INFERENCE_SALIENT_SLICES):
        tile = explain.overlay(volume[index], heat[index])
        explain.save_png(tile, _outputs() / folder / f"slice-{index:03d}.png")
        tiles.append(tile)
        draft.boxes.extend({**box, "slice_index": index} for box in explain.boxes(heat[index]))
    explain.save_png(explain.montage(tiles), _outputs() / folder / "montage.png")
    draft.heatmap_path = str(folder / "montage.png")


def _to_image_pixels(
    box: dict[str, Any], size: tuple[int, ...], shape: tuple[int, int]
) -> dict[str, Any]:
    """A box on the letterboxed model input, in the original image's pixel coordinates."""
    scale, top, left = preprocessing.letterbox(shape, (size[0], size[1]))
    return {
        **box,
        "x": round((box["x"] - left) / scale),
        "y": round((box["y"] - top) / scale),
        "width": round(box["width"] / scale),
        "height": round(box["height"] / scale),
    }


def _finish(
    *,
    job: InferenceJob,
    attempt: int,
    drafts: list[Draft],
    ensemble: Ensemble | None,
    timings: dict[str, float],
) -> None:
    with transaction.atomic():
        owned = InferenceJob.objects.filter(
            pk=job.pk, status=InferenceJob.Status.RUNNING, attempts=attempt
        ).update(status=InferenceJob.Status.SUCCEEDED, finished_at=timezone.now(), error="")
        if owned != 1:
            raise JobLost(f"job {job.pk} attempt {attempt} no longer owns the job")
        Prediction.objects.filter(job=job).delete()
        Prediction.objects.bulk_create(
            Prediction(
                job=job,
                series_id=job.series_id,
                instance=draft.instance,
                slice_index=draft.slice_index,
                status=draft.status,
                reason=draft.reason,
                label=draft.label,
                probabilities=draft.probabilities,
                probability=draft.probability,
                threshold=draft.threshold,
                model_name=ensemble.name if ensemble else "",
                model_version=ensemble.version if ensemble else "",
                model_sha256=ensemble.sha256 if ensemble else "",
                heatmap_path=draft.heatmap_path,
                boxes=draft.boxes,
                timings=timings,
            )
            for draft in drafts
        )
        # Newer results of the same analysis supersede older ones; the old rows stay.
        Prediction.objects.filter(
            series_id=job.series_id, job__task=job.task, job__pk__lt=job.pk, superseded=False
        ).update(superseded=True)
        export_enqueue(job_id=job.pk)  # DICOM results to the PACS, once this commits
    logger.info(
        "job %s: %d predictions (%s)",
        job.pk,
        len(drafts),
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
    )


def _softmax(logits: Array) -> Array:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=-1, keepdims=True), np.float32)


def _outputs() -> Path:
    return Path(settings.INFERENCE_OUTPUT_DIR)


def _output_folder(job: InferenceJob) -> Path:
    """Where a job's pictures go; built from UIDs that were sanitised when stored."""
    series = job.series
    folder = Path(series.study.study_instance_uid) / series.series_instance_uid / f"job-{job.pk}"
    (_outputs() / folder).mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 4)

"""One job's body as a plain function: plan, load, run the pipeline, write, save, queue sends.

Why apart from the runner (node.worker): claiming, device slots, the lease
heartbeat and the time limit are one way to drive a job; a task-queue worker
that claimed the job itself is another. ``run_job`` needs neither: the job
id, the name the job was claimed under, and a ``JobDeps``. Whoever calls it,
the guarantees live here and in storage.jobs:

* each stage is recorded on the job row while ``owner`` holds it;
* the results (Output and Finding rows, transfers) commit in ONE transaction
  with the DONE state, and only if ``owner`` still holds the job; otherwise
  ``JobNotHeldError`` and nothing is saved but the files under the job's id,
  which a rerun writes afresh.

A failure is the caller's to record (``record_failure``), because only the
caller knows whether it still supervises the job (a time limit may have
failed it already).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import NodeConfig
from node.findings import finding_rows, job_provenance
from node.quality import quality_row
from pipelines import registry
from pipelines.dicom_out import registry as writers
from pipelines.dicom_out.builtins import EVIDENCE_KINDS
from pipelines.results import AnalysisResult
from storage import jobs as job_store
from storage import models
from storage.db import Database
from storage.errors import (
    InputError,
    JobNotHeldError,
    ModelError,
    NodeError,
    PipelineError,
)
from storage.filestore import FileStore
from storage.models import Destination, Instance, Job, JobState, Output, RoutingRule

__all__ = [
    "JobDeps",
    "JobOutcome",
    "JobPlan",
    "Loader",
    "Queuer",
    "Writer",
    "WrittenLike",
    "default_load",
    "default_queue",
    "default_write",
    "plan_job",
    "record_failure",
    "reportable",
    "resolve_device",
    "run_job",
]

log = logging.getLogger(__name__)


class WrittenLike(Protocol):
    """What pipelines.dicom_out.write_results returns per object."""

    kind: str
    dataset: pydicom.Dataset


Loader = Callable[[Sequence[Path], int, Sequence[str]], tuple[Any, list[pydicom.Dataset]]]
Writer = Callable[[AnalysisResult, list[pydicom.Dataset], Sequence[str]], Sequence[WrittenLike]]
Queuer = Callable[[Session, list[Output], list[str]], Any]


def default_load(paths: Sequence[Path], min_slices: int,
                 kinds: Sequence[str]) -> tuple[Any, list[pydicom.Dataset]]:
    """The volume and its source datasets in slice order (pipelines.volume).

    Headers suffice for most writers; one that renders the source pixels (the
    Secondary Capture: ``needs_pixels`` in its registration) needs the full datasets.
    """
    from pipelines.volume import load_datasets, load_series

    volume = load_series(paths, min_slices=min_slices)
    headers = load_datasets(paths, min_slices=min_slices)
    if not any(writers.get(k).needs_pixels for k in kinds):
        return volume, headers
    full: dict[str, pydicom.Dataset] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID"))
        full[uid] = ds
    try:
        return volume, [full[uid] for uid in volume.sop_instance_uids]
    except KeyError as exc:
        raise PipelineError("load", f"source instance {exc} not found among the files") from exc


def default_write(result: AnalysisResult, sources: list[pydicom.Dataset],
                  kinds: Sequence[str]) -> Sequence[WrittenLike]:
    from pipelines.dicom_out import write_results

    return cast(Sequence[WrittenLike], write_results(result, sources, list(kinds)))


def default_queue(session: Session, outputs: list[Output], destinations: list[str]) -> Any:
    from node import send

    return send.queue_outputs(session, outputs, destinations)  # type: ignore[attr-defined]


def resolve_device(setting: str) -> str:
    """``auto`` means the first GPU when torch sees one, else the CPU."""
    if setting != "auto":
        return setting
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@dataclass(frozen=True, slots=True)
class JobDeps:
    """What a job runs with; the hooks are replaceable so tests and other runners can.

    ``device`` is already resolved (``resolve_device``): resolving ``auto``
    imports torch, which must not count against a job's time limit.
    """

    db: Database
    store: FileStore
    config: NodeConfig
    device: str
    load: Loader = default_load
    write: Writer = default_write
    queue: Queuer = default_queue


@dataclass(frozen=True, slots=True)
class JobPlan:
    """Everything a job run needs, read in one short transaction at its start."""

    job_id: int
    pipeline: str
    model_version: str
    series_uid: str
    paths: tuple[Path, ...]
    destinations: tuple[str, ...]
    kinds: tuple[str, ...]
    shadow: bool
    # Sentences the SR states about this run (e.g. the result it supersedes).
    notes: tuple[str, ...] = ()
    # The candidate model set's folder when the job's rule runs one (node.candidates);
    # None: the active models (inference.models_dir).
    models_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a finished job saved: for the caller's log line or task result."""

    job_id: int
    model_version: str
    outputs: tuple[str, ...]
    inference_s: float
    queued: bool  # transfers were queued for its destinations


def run_job(job_id: int, owner: str, deps: JobDeps, *,
            on_stage: Callable[[str], None] | None = None) -> JobOutcome:
    """Run a job that ``owner`` has claimed, from its plan to its saved results.

    ``on_stage`` hears each stage before it is recorded on the job row, so a
    supervisor can name the stage a time limit struck in. Raises what the
    stages raise; JobNotHeldError when the job was taken away meanwhile.
    """
    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)
        job_store.set_stage(deps.db, job_id, owner, name)

    plan = plan_job(deps, job_id)
    stage("load")
    inf = deps.config.inference
    pipeline = registry.get(plan.pipeline, models_dir=plan.models_dir or inf.models_dir,
                            device=inf.device)
    volume, sources = deps.load(list(plan.paths), pipeline.min_slices, plan.kinds)
    stage("infer")
    t0 = time.monotonic()
    evidence = bool(EVIDENCE_KINDS.intersection(plan.kinds))
    result, withheld = reportable(registry.run_pipeline(pipeline, volume, evidence=evidence))
    if plan.notes:
        result = replace(result, notes=(*result.notes, *plan.notes))
    infer_s = time.monotonic() - t0
    stage("write")
    objects = list(deps.write(result, sources, plan.kinds))
    stage("save")
    model_version = pipeline.model_version()
    queued = _save(deps, owner, plan, model_version, result, objects, infer_s, withheld)
    return JobOutcome(job_id, model_version, tuple(o.kind for o in objects),
                      round(infer_s, 3), queued)


def record_failure(db: Database, job_id: int, owner: str, exc: BaseException,
                   stage: str) -> JobState | None:
    """Record what ``run_job`` raised on the job; None when the job was not held any more.

    A job no longer held (cancelled, requeued, claimed by another) keeps
    whatever happened to it meanwhile: its result and its failure are refused.
    """
    if isinstance(exc, JobNotHeldError):
        log.warning("result refused: job not held", extra={"job_id": job_id})
        return None
    stage = exc.stage if isinstance(exc, PipelineError) else stage
    # Bad input or a missing model will not get better by retrying.
    retryable = not isinstance(exc, InputError | ModelError)
    text = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
    state = job_store.fail_job(db, job_id, owner, stage=stage, error=text, retryable=retryable)
    if not isinstance(exc, NodeError):
        log.error("job crashed", exc_info=exc, extra={"job_id": job_id, "stage": stage})
    return state


def plan_job(deps: JobDeps, job_id: int) -> JobPlan:
    with deps.db.session() as session:
        job = job_store.get_job(session, job_id)
        series = job.series
        paths = tuple(deps.store.spool_path(p) for p in session.scalars(
            select(Instance.path).where(Instance.series_id == series.id)
            .order_by(Instance.id)))
        if not paths:
            raise InputError(f"series {series.series_instance_uid} has no stored instances")
        rule = session.get(RoutingRule, job.rule_id) if job.rule_id is not None else None
        destinations = tuple(str(d) for d in rule.destinations) if rule else ()
        accepts: set[str] = set()
        configured = {d.name: d for d in deps.config.destinations}
        for name in destinations:
            row = session.scalars(select(Destination).where(Destination.name == name)).first()
            if row is not None:
                accepts.update(str(k) for k in row.accepts)
            elif name in configured:
                accepts.update(configured[name].accepts)
        kinds = tuple(k for k in writers.kinds() if k in accepts) or writers.default_kinds()
        return JobPlan(job_id, job.pipeline, job.model_version, series.series_instance_uid,
                       paths, destinations, kinds, job.shadow,
                       notes=supersession_notes(session, job, len(paths)),
                       models_dir=candidate_dir(session, rule.models if rule else None))


def candidate_dir(session: Session, name: str | None) -> Path | None:
    """The folder of candidate model set ``name``; a rule naming one that is gone fails
    the job (ModelError) rather than silently running the active models."""
    if name is None:
        return None
    from storage.models import ModelCandidate

    cand = session.scalars(select(ModelCandidate).where(ModelCandidate.name == name)).first()
    if cand is None or cand.state == "retired":
        raise ModelError(f"the job's rule runs candidate models {name!r}, which are not "
                         "registered (ainode models candidates)")
    return Path(cand.path)


def supersession_notes(session: Session, job: Job, instances: int) -> tuple[str, ...]:
    """What the new SR says when this job re-runs a series that grew after routing."""
    if job.supersedes_job_id is None:
        return ()
    old = session.get(Job, job.supersedes_job_id)
    before = "" if old is None or old.series_instance_count is None else \
        f" (made from {old.series_instance_count} instances)"
    return (f"Supersedes the earlier result of this series (job {job.supersedes_job_id}"
            f"{before}): more instances arrived after it; this result uses the "
            f"{instances} now received.",)


def reportable(result: AnalysisResult) -> tuple[AnalysisResult, dict[str, Any]]:
    """What the node reports of a result: all of it, or for a not-assessable one the verdict.

    A pipeline that says it cannot judge a series (a head CT sent to an
    abdominal model, an implausible "pancreas") vouches for none of its
    regions or scores: a SEG segment "Pancreas" on a brain, or a PDAC
    probability in a report headed "not assessable", is exactly what a
    reader must not be shown. So a not-assessable result goes to the writers
    with no segment and no scored finding, and with the impression
    "Not assessable: <reason>"; the SR then says that and nothing else, and
    no SEG, GSPS or SC is written. What was withheld stays in the job's
    provenance (the second value) for whoever investigates the model.
    """
    if result.assessed:
        return result, {}
    withheld: dict[str, Any] = {}
    if result.segments:
        withheld["segments"] = [s.key for s in result.segments]
    if result.findings:
        withheld["findings"] = [{"key": f.key, "kind": f.kind, "label": f.label,
                                 "probability": round(float(f.probability), 4)}
                                for f in result.findings]
    if result.summary_text:
        withheld["summary"] = result.summary_text
    return replace(result, segments=[], findings=[], summary_text=""), withheld


def _save(deps: JobDeps, owner: str, plan: JobPlan, model_version: str,
          result: AnalysisResult, objects: Sequence[WrittenLike], infer_s: float,
          withheld: dict[str, Any] | None = None) -> bool:
    """Files first, then one transaction with DONE; True when sends were queued."""
    files = []
    for obj in objects:
        ds = obj.dataset
        buf = io.BytesIO()
        try:
            ds.save_as(buf, enforce_file_format=True)
        except Exception as exc:
            raise PipelineError("write", f"{obj.kind} could not be encoded: {exc}") from exc
        stored = deps.store.write_result(plan.job_id, obj.kind, str(ds.SOPInstanceUID),
                                         buf.getvalue())
        files.append((obj, stored))
    queued = False
    with job_store.write_session(deps.db) as session:
        outcome = (models.JobOutcome.ASSESSED if result.assessed
                   else models.JobOutcome.NOT_ASSESSABLE)
        job = job_store.finish_job(
            session, plan.job_id, owner, outcome=outcome,
            outcome_reason=None if result.assessed else result.reason,
            claimed_by=owner, device=deps.device, pipeline_model_version=model_version,
            inference_s=round(infer_s, 3), outputs=[o.kind for o, _ in files],
            summary=result.summary(), **job_provenance(result),
        )
        if withheld:
            job.provenance = {**job.provenance, "withheld_not_assessable": withheld}
        if plan.models_dir is not None:
            job.provenance = {**job.provenance, "candidate_models_dir": str(plan.models_dir)}
        if plan.model_version and model_version != plan.model_version:
            job.provenance = {**job.provenance, "model_version_changed_from":
                              plan.model_version}
        outputs = []
        for obj, stored in files:
            ds = obj.dataset
            out = Output(job_id=job.id, kind=obj.kind, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID),
                         series_instance_uid=str(ds.SeriesInstanceUID), path=stored.relpath)
            session.add(out)
            outputs.append(out)
        session.add_all(finding_rows(job.id, result))
        if deps.config.qa.enabled:  # drift monitoring (node.quality), same transaction
            quality = quality_row(job, job.series, result, model_version=model_version)
            if quality is not None:
                session.add(quality)
        session.flush()
        if not plan.shadow and plan.destinations and outputs:
            deps.queue(session, outputs, list(plan.destinations))
            queued = True
    log.info("job results saved", extra={"job_id": plan.job_id, "outputs": len(files),
                                         "shadow": plan.shadow})
    return queued

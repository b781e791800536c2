"""The job runner behind ``ainode worker``: claim a job, run its pipeline, save, queue sends.

Why a separate entry point: inference is the heavy part, so it can run in its
own process (or on another machine with a GPU) against the same database,
while ``ainode serve`` keeps receiving. Jobs are claimed transactionally
(storage.jobs), so any number of workers can share one queue.

What makes a job run exactly once, even after SIGKILL:

* the claim commits RUNNING with a lease; a heartbeat renews it while the job runs;
* the results (Output and Finding rows, transfers) commit in ONE transaction
  with the job's DONE state, and only if this worker still holds the job;
* a worker that died leaves RUNNING with a lapsing lease (or a dead pid on this
  host): the next worker start or the scheduler requeues it, and the rerun
  writes its files afresh under the job's id.

Concurrency is bounded per device (``inference.max_jobs_per_device`` slots),
each job has a time limit (``inference.job_timeout_s``), and pipelines stay
loaded between jobs (pipelines.registry keeps the built instance).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import DEFAULT_ACCEPTS, NodeConfig
from pipelines import registry
from pipelines.results import AnalysisResult
from storage import jobs as job_store
from storage.db import Database
from storage.errors import ConflictError, InputError, ModelError, NodeError, PipelineError
from storage.filestore import FileStore
from storage.models import Destination, Finding, Instance, Output, RoutingRule

__all__ = ["JobPlan", "Worker", "WrittenLike", "resolve_device"]

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

    Headers suffice for SEG, SR and GSPS; a Secondary Capture renders the source
    pixels, so then the full datasets are read.
    """
    from pipelines.volume import load_datasets, load_series

    volume = load_series(paths, min_slices=min_slices)
    headers = load_datasets(paths, min_slices=min_slices)
    if "SC" not in kinds:
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


@dataclass
class _Run:
    plan: JobPlan | None = None
    stage: str = "claimed"
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Worker:
    """One device's job runner; ``max_jobs_per_device`` jobs at a time on it."""

    def __init__(
        self,
        db: Database,
        store: FileStore,
        config: NodeConfig,
        *,
        name: str | None = None,
        lease_s: float = 60.0,
        concurrency: int | None = None,
        job_timeout_s: float | None = None,
        load: Loader = default_load,
        write: Writer = default_write,
        queue: Queuer = default_queue,
    ) -> None:
        self.db = db
        self.store = store
        self.config = config
        self.name = name or job_store.new_worker_id()
        self.lease_s = lease_s
        self._device: str | None = None
        self.concurrency = concurrency or config.inference.max_jobs_per_device
        self.job_timeout_s = job_timeout_s or config.inference.job_timeout_s
        self._load = load
        self._write = write
        self._queue = queue
        self._slots = threading.BoundedSemaphore(self.concurrency)

    @property
    def device(self) -> str:
        """Resolved on the job-running thread once it has claimed its first job, before
        the job's clock starts: ``auto`` imports torch (seconds of CPU, about 300 MB),
        which a node that only receives should not pay, and which must not hold up
        start-up nor count against a job's time limit."""
        if self._device is None:
            self._device = resolve_device(self.config.inference.device)
        return self._device

    # -- entry points -------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Requeue jobs of dead local workers and expired leases (call at start-up)."""
        return job_store.recover_dead_local_workers(self.db) + job_store.requeue_expired(self.db)

    def run_once(self) -> int | None:
        """Claim and run one job in this thread (within a device slot); its id, or None."""
        if not self._slots.acquire(blocking=False):
            return None
        try:
            job_id = job_store.claim_next(self.db, self.name, lease_s=self.lease_s)
            if job_id is not None:
                _ = self.device  # before the job's clock starts
                self._supervise(job_id)
            return job_id
        finally:
            self._slots.release()

    def run_available(self, max_jobs: int | None = None) -> int:
        """Run queued jobs one after the other until none is left; returns how many ran."""
        ran = 0
        while max_jobs is None or ran < max_jobs:
            if self.run_once() is None:
                break
            ran += 1
        return ran

    def serve(self, stop: threading.Event, *, poll_s: float = 2.0) -> None:
        """Run jobs on ``concurrency`` slot threads until ``stop`` is set."""
        def slot() -> None:
            while not stop.is_set():
                try:
                    job_id = job_store.claim_next(self.db, self.name, lease_s=self.lease_s)
                except NodeError as exc:
                    log.error("claim failed", extra={"error": str(exc)})
                    job_id = None
                except Exception:
                    log.exception("claim crashed")
                    job_id = None
                if job_id is None:
                    stop.wait(poll_s)
                    continue
                _ = self.device  # before the job's clock starts
                self._supervise(job_id)

        threads = [threading.Thread(target=slot, name=f"ainode-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # -- one job ------------------------------------------------------------------------
    def _supervise(self, job_id: int) -> None:
        """Run the job on its own thread; renew the lease, enforce the time limit."""
        run = _Run()
        thread = threading.Thread(target=self._execute, args=(job_id, run),
                                  name=f"ainode-job-{job_id}", daemon=True)
        started = time.monotonic()
        thread.start()
        heartbeat = max(0.05, self.lease_s / 3)
        lost = False
        while not run.done.wait(heartbeat):
            if time.monotonic() - started > self.job_timeout_s:
                job_store.fail_job(self.db, job_id, self.name, stage=run.stage,
                                   error=f"time limit of {self.job_timeout_s:g} s exceeded "
                                         f"in stage {run.stage}", retryable=False)
                log.error("job timed out", extra={"job_id": job_id, "stage": run.stage})
                # Python cannot kill a thread: the slot stays taken until it returns,
                # so the device never runs more jobs than its slots. Its result is refused.
                run.done.wait()
                return
            if not lost and not job_store.renew_lease(self.db, job_id, self.name,
                                                      lease_s=self.lease_s):
                lost = True  # cancelled or taken over: let it finish, its result is refused
                log.warning("job no longer held; its result will be discarded",
                            extra={"job_id": job_id})
        if run.error is not None:
            self._record_failure(job_id, run)

    def _record_failure(self, job_id: int, run: _Run) -> None:
        exc = run.error
        assert exc is not None
        if isinstance(exc, ConflictError):
            log.warning("result refused: job not held", extra={"job_id": job_id})
            return
        stage = exc.stage if isinstance(exc, PipelineError) else run.stage
        # Bad input or a missing model will not get better by retrying.
        retryable = not isinstance(exc, InputError | ModelError)
        text = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
        job_store.fail_job(self.db, job_id, self.name, stage=stage, error=text,
                           retryable=retryable)
        if not isinstance(exc, NodeError):
            log.error("job crashed", exc_info=exc, extra={"job_id": job_id, "stage": stage})

    def _stage(self, run: _Run, job_id: int, stage: str) -> None:
        run.stage = stage
        job_store.set_stage(self.db, job_id, self.name, stage)

    def _execute(self, job_id: int, run: _Run) -> None:
        try:
            plan = self._plan(job_id)
            run.plan = plan
            self._stage(run, job_id, "load")
            inf = self.config.inference
            pipeline = registry.get(plan.pipeline, models_dir=inf.models_dir, device=inf.device)
            volume, sources = self._load(list(plan.paths), pipeline.min_slices, plan.kinds)
            self._stage(run, job_id, "infer")
            t0 = time.monotonic()
            result = pipeline.run(volume)
            infer_s = time.monotonic() - t0
            self._stage(run, job_id, "write")
            objects = list(self._write(result, sources, plan.kinds))
            self._stage(run, job_id, "save")
            self._save(plan, pipeline.model_version(), result, objects, infer_s)
        except BaseException as exc:  # recorded on the job by the supervising thread
            run.error = exc
        finally:
            run.done.set()

    def _plan(self, job_id: int) -> JobPlan:
        with self.db.session() as session:
            job = job_store.get_job(session, job_id)
            series = job.series
            paths = tuple(self.store.spool_path(p) for p in session.scalars(
                select(Instance.path).where(Instance.series_id == series.id)
                .order_by(Instance.id)))
            if not paths:
                raise InputError(f"series {series.series_instance_uid} has no stored instances")
            rule = session.get(RoutingRule, job.rule_id) if job.rule_id is not None else None
            destinations = tuple(str(d) for d in rule.destinations) if rule else ()
            accepts: set[str] = set()
            configured = {d.name: d for d in self.config.destinations}
            for name in destinations:
                row = session.scalars(select(Destination).where(Destination.name == name)).first()
                if row is not None:
                    accepts.update(str(k) for k in row.accepts)
                elif name in configured:
                    accepts.update(configured[name].accepts)
            kinds = tuple(k for k in ("SEG", "SR", "GSPS", "SC") if k in accepts) or \
                tuple(DEFAULT_ACCEPTS)
            return JobPlan(job_id, job.pipeline, job.model_version, series.series_instance_uid,
                           paths, destinations, kinds, job.shadow)

    def _save(self, plan: JobPlan, model_version: str, result: AnalysisResult,
              objects: Sequence[WrittenLike], infer_s: float) -> None:
        files = []
        for obj in objects:
            ds = obj.dataset
            buf = io.BytesIO()
            try:
                ds.save_as(buf, enforce_file_format=True)
            except Exception as exc:
                raise PipelineError("write", f"{obj.kind} could not be encoded: {exc}") from exc
            stored = self.store.write_result(plan.job_id, obj.kind, str(ds.SOPInstanceUID),
                                             buf.getvalue())
            files.append((obj, stored))
        with job_store.write_session(self.db) as session:
            job = job_store.finish_job(
                session, plan.job_id, self.name,
                claimed_by=self.name, device=self.device, pipeline_model_version=model_version,
                inference_s=round(infer_s, 3), outputs=[o.kind for o, _ in files],
                summary=result.summary(), **_provenance(result),
            )
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
            session.add_all(_findings(job.id, result))
            session.flush()
            if not plan.shadow and plan.destinations and outputs:
                self._queue(session, outputs, list(plan.destinations))
        log.info("job results saved", extra={"job_id": plan.job_id, "outputs": len(files),
                                             "shadow": plan.shadow})


def _provenance(result: AnalysisResult) -> dict[str, Any]:
    return {"algorithm": result.algorithm.name, "algorithm_version": result.algorithm.version,
            "result": {k: v for k, v in result.provenance.items()
                       if isinstance(v, str | int | float | bool | type(None))}}


def _findings(job_id: int, result: AnalysisResult) -> list[Finding]:
    rows = [Finding(job_id=job_id, kind="patient", label="PDAC probability",
                    probability=float(result.patient_score),
                    details={"pancreas_found": result.pancreas_found,
                             "classification": result.classification or {},
                             "summary": result.summary()})]
    for les in result.lesions:
        rows.append(Finding(
            job_id=job_id, kind="lesion", label=les.label, probability=float(les.confidence),
            location=les.location, diameter_mm=float(les.diameter_mm),
            volume_ml=float(les.volume_ml),
            mean_hu=None if les.mean_hu is None else float(les.mean_hu),
            tracking_uid=les.tracking_uid or None,
            details={"index": les.index, "centroid_lps_mm": list(les.centroid_lps_mm),
                     "type_probabilities": les.type_probabilities or {}},
        ))
    return rows

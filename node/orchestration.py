"""The node's periodic work as plain functions, and their registration with APScheduler.

Each task reads its work from rows and commits a state change, so it can run
in any order, on any interval, be interrupted at any point and run again:

* ``close_series``   receiving -> complete once a series is quiet for the stable age
* ``route_series``   complete -> routed: evaluate the rules, one Job per matched rule;
                     a series that is no image (localizer, Secondary Capture, derived,
                     colour, a result object) is routed with no job and its reason
* ``dispatch_jobs``  requeue jobs whose worker died; run queued jobs when this process
                     has an in-process worker (``ainode worker`` runs them otherwise)
* ``send_results``   retry due transfers (node.send) and record per-job turnaround
* ``clean_spool``    delete received files past retention, never with unfinished work
* ``sweep_queue``    with Celery dispatch only: re-publish queued jobs whose message
                     may be lost (node.queue.publish)

With a ``publisher`` (``queue.broker_url`` set), a job is published as a
Celery task when routing creates it and when a lapsed lease requeues it.

Why plain functions taking a ``Services`` bundle: tests call them directly and
deterministically (``now=``), and the scheduler only decides *when*. A series
that arrived while the node was down is simply a row in ``receiving`` with an
old ``last_received_at``: the first ``close_series`` after start-up completes it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, selectinload

from node.config import NodeConfig
from node.routing import RuleSpec, evaluate_rule, opts_in, referenced_keys, series_attributes
from node.routing.rules import RuleEvaluation
from node.routing.store import current_rules, rule_key, spec_of
from pipelines import registry
from pipelines.dicom_out import registry as writers
from storage import jobs as job_store
from storage.audit import audit
from storage.db import Database
from storage.errors import InputError, ModelError, NodeError
from storage.filestore import FileStore
from storage.image_kind import NotAnImage, not_an_image
from storage.ingest.header import header_attributes, read_file_header
from storage.models import (
    Instance,
    Job,
    JobState,
    Output,
    RoutingRule,
    Series,
    SeriesState,
    Transfer,
    TransferState,
    utcnow,
)

if TYPE_CHECKING:
    from node.worker import Worker

__all__ = [
    "DEFAULT_INTERVALS",
    "JobPublisher",
    "RoutingOutcome",
    "Services",
    "check_quality",
    "clean_spool",
    "close_series",
    "decisive_attributes",
    "dispatch_jobs",
    "evaluate_series",
    "not_an_image_series",
    "record_turnaround",
    "register_tasks",
    "registry_model_version",
    "route_series",
    "send_results",
    "skip_decision",
    "sweep_queue",
]

log = logging.getLogger(__name__)

# Seconds between runs of each task.
DEFAULT_INTERVALS: dict[str, float] = {
    "close_series": 2.0,
    "route_series": 2.0,
    "dispatch_jobs": 5.0,
    "send_results": 5.0,
    "clean_spool": 3600.0,
    "sweep_queue": 0.0,  # only with Celery dispatch: NodeService sets queue.sweep_interval_s
    "check_quality": 0.0,  # NodeService sets qa.interval_s when qa.enabled
}


class JobPublisher(Protocol):
    """What the tasks need of node.queue.Publisher (kept apart: celery stays optional here)."""

    def publish(self, job_ids: Iterable[int], reason: str) -> list[int]: ...

    def sweep(self) -> list[int]: ...


def registry_model_version(pipeline: str, *, models_dir: Path | None = None,
                           device: str = "auto") -> str:
    """The version of the loaded pipeline (its models stay loaded for the worker)."""
    try:
        return registry.get(pipeline, models_dir=models_dir, device=device).model_version()
    except ModelError as exc:
        # The job is still created; the worker records why it cannot run.
        log.warning("pipeline unavailable at routing", extra={"pipeline": pipeline,
                                                              "error": str(exc)})
        return ""


@dataclass
class Services:
    """What the periodic tasks need, passed in (the node's or a test's)."""

    config: NodeConfig
    db: Database
    store: FileStore
    model_version_of: Callable[[str], str] | None = None  # default: the configured models
    worker: Worker | None = None  # in-process job runner, if this process runs jobs
    send_due: Callable[[Database, FileStore, NodeConfig], Any] | None = None
    publisher: JobPublisher | None = None  # Celery dispatch (node.queue), when configured
    extra: dict[str, Any] = field(default_factory=dict)

    def model_version(self, pipeline: str) -> str:
        if self.model_version_of is not None:
            return self.model_version_of(pipeline)
        inf = self.config.inference
        return registry_model_version(pipeline, models_dir=inf.models_dir, device=inf.device)


# -- completion --------------------------------------------------------------------------


def close_series(services: Services, *, now: datetime | None = None) -> int:
    """Complete quiet series (storage.series); returns how many were closed.

    The node's only completion step: NodeService schedules this one on its own,
    shorter tick rather than keeping a second copy.
    """
    from storage.series import close_stable_series

    done = close_stable_series(services.db, services.config.series.stable_age_s,
                               now or utcnow())
    return len(done)


# -- routing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutingOutcome:
    series_uid: str
    evaluations: tuple[RuleEvaluation, ...]
    jobs_created: tuple[int, ...]
    jobs_existing: tuple[int, ...]
    deferred: bool = False  # a matched rule's own stable age has not passed yet
    skipped: str | None = None  # why a matched series got no job: it is no image series


def evaluate_series(session: Session, series: Series, specs: Sequence[RuleSpec],
                    store: FileStore | None) -> list[RuleEvaluation]:
    """Every rule against one stored series (also what `rules test --series` shows).

    The stored routing attributes are used first; a keyword a rule needs that
    the receiver did not keep is read from the header of one stored instance.
    """
    header = None
    if store is not None:
        inst = session.scalars(select(Instance).where(Instance.series_id == series.id)
                               .order_by(Instance.instance_number, Instance.id).limit(1)).first()
        header = None if inst is None else store.spool_path(inst.path)
    attrs = series_attributes(
        series.attributes or {},
        calling_ae=series.calling_ae,
        columns={"Modality": series.modality, "SeriesDescription": series.series_description,
                 "BodyPartExamined": series.body_part, "SeriesNumber": series.series_number},
        needed=referenced_keys(specs),
        header_path=header,
    )
    return [evaluate_rule(spec, attrs) for spec in specs]


def _load_rules(session: Session) -> list[tuple[RoutingRule, RuleSpec]]:
    out = []
    for row in current_rules(session):
        try:
            out.append((row, spec_of(row)))
        except NodeError as exc:  # a row edited by hand into something invalid
            log.error("stored rule is invalid; skipped", extra={"rule": rule_key(row),
                                                                 "error": str(exc)})
    return out


def _route_one(session: Session, services: Services, series: Series,
               rules: Sequence[tuple[RoutingRule, RuleSpec]], versions: dict[str, str],
               now: datetime) -> RoutingOutcome:
    evaluations = evaluate_series(session, series, [spec for _, spec in rules], services.store)
    matched = [(row, spec) for (row, spec), ev in zip(rules, evaluations, strict=True)
               if ev.matched]
    quiet_s = (now - series.last_received_at).total_seconds()
    default_age = services.config.series.stable_age_s
    wait = max((spec.stable_age_s or default_age for _, spec in matched), default=0.0)
    study_uid, series_uid = series.study.study_instance_uid, series.series_instance_uid
    if matched and quiet_s < wait:
        return RoutingOutcome(series.series_instance_uid, tuple(evaluations), (), (), True)
    if not matched:
        if series.state != SeriesState.COMPLETE:
            # Only a rule's shorter stable age brought it here; the global one decides.
            return RoutingOutcome(series.series_instance_uid, tuple(evaluations), (), (), True)
        series.state = SeriesState.ROUTED
        audit(session, "series.unrouted", actor="scheduler", study_uid=study_uid,
              series_uid=series_uid,
              rules={ev.rule: ev.explain() for ev in evaluations})
        log.info("series matched no rule", extra={"series_uid": series.series_instance_uid})
        return RoutingOutcome(series.series_instance_uid, tuple(evaluations), (), ())
    skipped = not_an_image_series(session, series, services.store)
    held_back: dict[str, str] = {}
    if skipped is not None:
        decisive = decisive_attributes(skipped, series.modality)
        held_back = {rule_key(r): skipped.reason for r, s in matched if not opts_in(s, decisive)}
        matched = [(r, s) for r, s in matched if opts_in(s, decisive)]
        if not matched:
            return _skip(session, series, skipped, sorted(held_back), evaluations, now)
    created: list[int] = []
    existing: list[int] = []
    # The routing decision is recorded before the jobs it creates, so the audit
    # trail reads in causal order: ... -> series.routed -> job.created -> ...
    routed = audit(session, "series.routed", actor="scheduler", study_uid=study_uid,
                   series_uid=series_uid, rules=[rule_key(r) for r, _ in matched])
    if skipped is not None:  # routed on purpose by a rule that names what it is
        routed.details = {**routed.details, "not_an_image": skipped.to_dict(),
                          "rules_skipped": held_back}
    session.flush()
    for row, spec in matched:
        req = job_store.JobRequest(
            pipeline=spec.pipeline,
            model_version=_version(versions, services, spec.pipeline,
                                   _candidate(session, spec.models)),
            rule=row,
            priority=spec.priority,
            shadow=spec.shadow,
        )
        job, new = _job_for_version(session, services, series, req)
        (created if new else existing).append(job.id)
    if series.completed_at is None:
        series.completed_at = now
    series.state = SeriesState.ROUTED
    series.skip_reason = None  # routed now, whatever an earlier routing of it said
    routed.details = {**routed.details, "jobs_created": created, "jobs_existing": existing}
    log.info("series routed", extra={"series_uid": series.series_instance_uid,
                                     "jobs_created": created, "jobs_existing": existing})
    return RoutingOutcome(series.series_instance_uid, tuple(evaluations), tuple(created),
                          tuple(existing))


def _job_for_version(session: Session, services: Services, series: Series,
                     req: job_store.JobRequest) -> tuple[Job, bool]:
    """The job for this version of the series: a series that grew after its job ran
    gets a new job superseding that one (``series.rerun_on_growth``).

    Why: instances arriving after routing (two late slices) reopen the series;
    a result made from 28 of 30 images must not stand as if it were the
    series' result. A job still queued has not read the series yet, so it
    simply covers the new version. Audited either way: ``job.superseded``, or
    ``series.grown_not_rerun`` when the switch is off.
    """
    latest = session.scalars(
        select(Job).where(Job.series_id == series.id, Job.rule_key == req.rule_key,
                          Job.pipeline == req.pipeline, Job.model_version == req.model_version)
        .order_by(Job.generation.desc()).limit(1)).first()
    count = series.instance_count
    grown = (latest is not None and latest.series_instance_count is not None
             and count > latest.series_instance_count)
    if latest is None or not grown:
        return job_store.ensure_job(session, series, req)
    assert latest is not None and latest.series_instance_count is not None
    ids = {"study_uid": series.study.study_instance_uid,
           "series_uid": series.series_instance_uid}
    if latest.state == JobState.QUEUED:
        latest.series_instance_count = count
        return latest, False
    if not services.config.series.rerun_on_growth:
        audit(session, "series.grown_not_rerun", actor="scheduler", job_id=latest.id,
              instances_before=latest.series_instance_count, instances_now=count, **ids)
        log.warning("series grew after its job; not re-run (series.rerun_on_growth is off)",
                    extra={"series_uid": series.series_instance_uid, "job_id": latest.id})
        return latest, False
    job, _ = job_store.ensure_job(session, series, req, new_generation=True)
    job.series_instance_count = count
    job.supersedes_job_id = latest.id
    audit(session, "job.superseded", actor="scheduler", job_id=latest.id,
          superseded_by=job.id, instances_before=latest.series_instance_count,
          instances_now=count, **ids)
    log.info("series grew after routing: new job supersedes the old result", extra={
        "series_uid": series.series_instance_uid, "job_id": job.id,
        "supersedes_job_id": latest.id})
    return job, True


def not_an_image_series(session: Session, series: Series,
                        store: FileStore | None) -> NotAnImage | None:
    """Why ``series`` is no image series to send to a pipeline (storage.image_kind), or None.

    The stored attributes are those of the first instance received; for a
    localizer, the last instance received is read too (see :func:`skip_decision`).
    """
    def last_header() -> dict[str, Any] | None:
        if series.instance_count < 2 or store is None:
            return None
        last = session.scalars(select(Instance).where(Instance.series_id == series.id)
                               .order_by(Instance.id.desc()).limit(1)).first()
        if last is None:
            return None
        return {**header_attributes(read_file_header(store.spool_path(last.path))),
                "Modality": series.modality}

    return skip_decision({**(series.attributes or {}), "Modality": series.modality},
                         last_header, series_uid=series.series_instance_uid)


def skip_decision(first: dict[str, Any], later: Callable[[], dict[str, Any] | None], *,
                  series_uid: str = "") -> NotAnImage | None:
    """Why a series whose first header gives ``first`` is no image series, or None.

    What routing decides (and ``ainode rules test`` shows). A localizer first
    in a series that goes on with axial images is a mixed series the volume
    loader copes with (it drops the localizer slices), so for a localizer one
    more header is asked for, ``later()`` (the last instance; None when there is
    none), and the series is routed when that one is an image.
    """
    results = writers.result_sop_classes()
    kind = not_an_image(first, result_sop_classes=results)
    if kind is None or kind.kind != "localizer":
        return kind
    try:
        other = later()
    except InputError as exc:
        log.warning("cannot read a second header to check a localizer: %s", exc)
        return kind
    if other is not None and not_an_image(other, result_sop_classes=results) is None:
        log.info("series starts with a localizer but holds images; routed",
                 extra={"series_uid": series_uid})
        return None
    return kind


def decisive_attributes(kind: NotAnImage, modality: str | None) -> dict[str, Any]:
    """The attributes a rule must name to route this non-image series on purpose."""
    decisive: dict[str, Any] = {kind.keyword: kind.value}
    if kind.kind == "result object" and modality:
        decisive["Modality"] = modality
    return decisive


def _skip(session: Session, series: Series, kind: NotAnImage, rules: list[str],
          evaluations: Sequence[RuleEvaluation], now: datetime) -> RoutingOutcome:
    """Routed with no job: the series is no image a pipeline can judge, and says why.

    Not a failed job: nothing went wrong, and a job that can only fail would
    send the admin looking for a fault that is not there.
    """
    series.state = SeriesState.ROUTED
    series.skip_reason = kind.reason[:256]
    if series.completed_at is None:
        series.completed_at = now
    audit(session, "series.skipped", actor="scheduler",
          study_uid=series.study.study_instance_uid, series_uid=series.series_instance_uid,
          reason=kind.reason, kind=kind.kind, keyword=kind.keyword, value=kind.value,
          rules=rules)
    log.info("series skipped: not an image series", extra={
        "series_uid": series.series_instance_uid, "reason": kind.reason})
    return RoutingOutcome(series.series_instance_uid, tuple(evaluations), (), (),
                          skipped=kind.reason)


def _version(versions: dict[str, str], services: Services, pipeline: str,
             models_dir: Path | None = None) -> str:
    if models_dir is not None:  # a shadow rule's candidate models (node.candidates)
        key = f"{pipeline}@{models_dir}"
        if key not in versions:
            inf = services.config.inference
            versions[key] = registry_model_version(pipeline, models_dir=models_dir,
                                                   device=inf.device)
        return versions[key]
    if pipeline not in versions:  # a rule added between our two reads: rare, so inline
        versions[pipeline] = services.model_version(pipeline)
    return versions[pipeline]


def _candidate(session: Session, name: str | None) -> Path | None:
    """The folder of the candidate model set a rule runs (None: the active models)."""
    if name is None:
        return None
    from node.jobs.run import candidate_dir

    try:
        return candidate_dir(session, name)
    except ModelError as exc:  # the job is still made; the worker records why it fails
        log.warning("candidate models unavailable at routing", extra={"error": str(exc)})
        return None


def route_series(services: Services, *, now: datetime | None = None,
                 limit: int = 200) -> list[RoutingOutcome]:
    """Route completed series: one Job per matched rule, none twice for the same work.

    A rule with its own stable age shorter than the global one also routes a
    series still receiving once it has been quiet that long; a longer one
    holds the series back until it has.
    """
    now = now or utcnow()
    outcomes: list[RoutingOutcome] = []
    # Model versions first, outside the write transaction: building a pipeline
    # may load a model, and SQLite's write lock must not wait on that.
    with services.db.session() as session:
        pipelines = {spec.pipeline for _, spec in _load_rules(session) if spec.enabled}
    versions = {p: services.model_version(p) for p in sorted(pipelines)}
    with job_store.write_session(services.db) as session:
        rules = _load_rules(session)
        enabled = [(r, s) for r, s in rules if s.enabled]
        ages = [s.stable_age_s for _, s in enabled if s.stable_age_s is not None]
        shortest = min(ages, default=None)
        conds = [Series.state == SeriesState.COMPLETE]
        if shortest is not None and shortest < services.config.series.stable_age_s:
            conds.append((Series.state == SeriesState.RECEIVING)
                         & (Series.last_received_at <= now - timedelta(seconds=shortest)))
        q = (select(Series).options(selectinload(Series.study))
             .where(conds[0] if len(conds) == 1 else conds[0] | conds[1])
             .order_by(Series.last_received_at, Series.id).limit(limit))
        for series in session.scalars(q):
            outcomes.append(_route_one(session, services, series, rules, versions, now))
    if services.publisher is not None:  # after the commit: a worker must find the row
        services.publisher.publish([j for o in outcomes for j in o.jobs_created], "routed")
    return outcomes


# -- jobs -----------------------------------------------------------------------------------


def dispatch_jobs(services: Services) -> int:
    """Requeue orphaned jobs; with an in-process worker, run what is queued.

    Returns the number of jobs requeued plus the number run here.
    """
    requeued = job_store.requeue_expired(services.db)
    if services.publisher is not None:
        services.publisher.publish(requeued, "requeued")
    ran = 0
    if services.worker is not None:
        ran = services.worker.run_available()
    return len(requeued) + ran


def sweep_queue(services: Services) -> int:
    """Re-publish queued jobs whose message may be lost (Celery dispatch only)."""
    if services.publisher is None:
        return 0
    return len(services.publisher.sweep())


# -- sending and turnaround ----------------------------------------------------------------


def _default_send_due() -> Callable[[Database, FileStore, NodeConfig], Any] | None:
    try:
        module = importlib.import_module("node.send")
    except ModuleNotFoundError as exc:
        if exc.name not in ("node.send",):
            raise
        return None
    fn = getattr(module, "send_due", None)
    return fn if callable(fn) else None


def send_results(services: Services, *, now: datetime | None = None) -> int:
    """Retry due transfers, then record turnaround of jobs now fully delivered."""
    send_due = services.send_due or _default_send_due()
    if send_due is not None:
        send_due(services.db, services.store, services.config)
    return record_turnaround(services.db, now=now)


def record_turnaround(db: Database, *, now: datetime | None = None) -> int:
    """For done jobs whose every transfer was accepted: delivered_at and turnaround_s.

    Turnaround runs from the series' last received instance to the last
    destination's acceptance. A job with nothing to send (shadow, no
    destination) is delivered when it finished.
    """
    now = now or utcnow()
    count = 0
    with job_store.write_session(db) as session:
        q = (select(Job).options(selectinload(Job.series))
             .where(Job.state == JobState.DONE, Job.delivered_at.is_(None)))
        for job in session.scalars(q):
            rows = session.execute(
                select(Transfer.state, Transfer.sent_at).join(Output)
                .where(Output.job_id == job.id)).all()
            if any(state != TransferState.SENT for state, _ in rows):
                continue  # pending or given up: not delivered (yet)
            sent = [at for _, at in rows if at is not None]
            delivered = max(sent) if sent else (job.finished_at or now)
            job.delivered_at = delivered
            job.turnaround_s = max(0.0, (delivered - job.series.last_received_at)
                                   .total_seconds())
            audit(session, "job.delivered", actor="scheduler", job_id=job.id,
                  series_uid=job.series.series_instance_uid, turnaround_s=job.turnaround_s,
                  transfers=len(rows))
            count += 1
    return count


# -- retention -------------------------------------------------------------------------------


def check_quality(services: Services) -> int:
    """Drift monitoring (node.quality): store each group's state, audit new alerts.

    Returns how many groups are in alert now.
    """
    from node.quality import run_quality_check

    return sum(1 for r in run_quality_check(services.db, services.config) if r.alerts)


def clean_spool(services: Services, *, now: datetime | None = None) -> list[str]:
    """Delete the received files of routed series older than the retention period.

    Never a series with unfinished work: not yet routed, a job queued or
    running, or an output still waiting to be sent. Rows stay (the audit
    trail and results refer to them); only instance files and rows go.
    Returns the series UIDs cleaned.
    """
    now = now or utcnow()
    cutoff = now - timedelta(days=services.config.storage.retention_days)
    unfinished_job = exists().where(Job.series_id == Series.id,
                                    Job.state.in_(job_store.ACTIVE_STATES))
    pending_send = exists().where(
        Job.series_id == Series.id, Output.job_id == Job.id, Transfer.output_id == Output.id,
        Transfer.state == TransferState.PENDING)
    has_files = exists().where(Instance.series_id == Series.id)
    cleaned: list[str] = []
    with job_store.write_session(services.db) as session:
        q = (select(Series).options(selectinload(Series.study))
             .where(Series.state == SeriesState.ROUTED, Series.last_received_at < cutoff,
                    ~unfinished_job, ~pending_send, has_files))
        for series in session.scalars(q):
            study_uid = series.study.study_instance_uid
            n = session.scalar(select(func.count()).select_from(Instance)
                               .where(Instance.series_id == series.id)) or 0
            for inst in session.scalars(select(Instance).where(Instance.series_id == series.id)):
                session.delete(inst)
            session.flush()
            services.store.remove_series(study_uid, series.series_instance_uid)
            audit(session, "series.purged", actor="scheduler", study_uid=study_uid,
                  series_uid=series.series_instance_uid, instances=n,
                  retention_days=services.config.storage.retention_days)
            cleaned.append(series.series_instance_uid)
    for uid in cleaned:
        log.info("series purged from spool", extra={"series_uid": uid})
    return cleaned


# -- scheduler --------------------------------------------------------------------------------


class _Scheduler(Protocol):
    def add_job(self, func: Callable[..., Any], trigger: str, **kwargs: Any) -> Any: ...


def _guarded(name: str, task: Callable[[Services], Any], services: Services) -> Callable[[], None]:
    def run() -> None:
        # A failing task is logged and retried on its next tick; it never stops the scheduler.
        try:
            task(services)
        except NodeError as exc:
            log.error("periodic task failed", extra={"task": name, "error": str(exc)})
        except Exception:
            log.exception("periodic task crashed", extra={"task": name})

    run.__name__ = f"ainode_{name}"
    return run


def register_tasks(scheduler: _Scheduler, services: Services,
                   intervals: dict[str, float] | None = None) -> list[str]:
    """Add the periodic tasks to an APScheduler (3.x) scheduler; returns their job ids.

    ``max_instances=1`` and ``coalesce`` keep a slow run from piling up behind
    itself. An interval of 0 leaves that task out (e.g. ``dispatch_jobs`` when
    only separate ``ainode worker`` processes run jobs — it still requeues).
    """
    tasks: dict[str, Callable[[Services], Any]] = {
        "close_series": close_series,
        "route_series": route_series,
        "dispatch_jobs": dispatch_jobs,
        "send_results": send_results,
        "clean_spool": clean_spool,
        "sweep_queue": sweep_queue,
        "check_quality": check_quality,
    }
    chosen = {**DEFAULT_INTERVALS, **(intervals or {})}
    ids = []
    for name, task in tasks.items():
        seconds = chosen.get(name, 0)
        if not seconds:
            continue
        job_id = f"ainode.{name}"
        scheduler.add_job(_guarded(name, task, services), "interval", seconds=seconds,
                          id=job_id, name=job_id, max_instances=1, coalesce=True,
                          replace_existing=True)
        ids.append(job_id)
    return ids

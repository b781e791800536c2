"""``ainode jobs`` and ``ainode reprocess``: see, retry and cancel pipeline runs."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from node.cli import workers_view
from node.cli.context import get
from node.cli.output import emit
from node.orchestration import evaluate_series, registry_model_version
from node.routing import store as rule_store
from pipelines.results import people_probability
from storage import jobs as job_store
from storage import workers as worker_store
from storage.audit import os_actor
from storage.errors import InputError
from storage.models import (
    Finding,
    Job,
    JobOutcome,
    JobState,
    Output,
    Series,
    Transfer,
    TransferState,
)

__all__ = ["app", "reprocess"]

app = typer.Typer(help="Pipeline jobs: list, show, retry, cancel.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table")]
# What fits a terminal; --wide shows ALL_COLUMNS.
COLUMNS = ("id", "state", "send", "outcome", "series", "rule", "pipeline", "finished_at",
           "error")
ALL_COLUMNS = ("id", "state", "send", "outcome", "priority", "series", "rule", "pipeline",
               "model_version", "attempts", "stage", "created_at", "finished_at",
               "turnaround_s", "error", "outcome_reason", "supersedes")


def send_state(states: list[TransferState]) -> str:
    """One word for a job's transfers, beside its state: ``done`` is not ``delivered``.

    ``-`` nothing to send; ``sent``; ``pending 2/4`` (2 of 4 still to go);
    ``failed 1/4`` (given up on 1 of 4) wins over pending, as it needs the admin.
    """
    if not states:
        return "-"
    n = len(states)
    failed = sum(1 for t in states if t is TransferState.FAILED)
    pending = sum(1 for t in states if t is TransferState.PENDING)
    if failed:
        return f"failed {failed}/{n}"
    if pending:
        return f"pending {pending}/{n}"
    return "sent"


def _send_states(session: Session, job_ids: list[int]) -> dict[int, str]:
    found: dict[int, list[TransferState]] = {j: [] for j in job_ids}
    if job_ids:
        for job_id, state in session.execute(
                select(Output.job_id, Transfer.state).join(Transfer, Transfer.output_id
                                                           == Output.id)
                .where(Output.job_id.in_(job_ids))):
            found[job_id].append(state)
    return {j: send_state(v) for j, v in found.items()}


def _row(job: Job, live: set[str] | None = None) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state, "priority": job.priority,
        "series": job.series.series_instance_uid, "rule": job.rule_key,
        "pipeline": job.pipeline, "model_version": job.model_version,
        "generation": job.generation, "shadow": job.shadow, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "stage": job.stage, "worker": job.worker,
        "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "delivered_at": job.delivered_at,
        "turnaround_s": None if job.turnaround_s is None else round(job.turnaround_s, 1),
        "error": job.error,
        # The verdict of a done job; None (shown "-") while unfinished, failed, or older.
        "outcome": job.outcome, "outcome_reason": job.outcome_reason,
        "supersedes": getattr(job, "supersedes_job_id", None),
        # Celery dispatch: the queue of its last message, and why a queued job waits.
        "queue": job.queue, "published_at": job.published_at,
        "waiting": None if live is None else workers_view.waiting_reason(job, live),
    }


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    series: Annotated[str | None, typer.Option(help="only this series UID")] = None,
    outcome: Annotated[JobOutcome | None, typer.Option(
        help="only done jobs with this verdict (assessed, not_assessable)")] = None,
    limit: Annotated[int, typer.Option(help="newest N")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first, with each done job's outcome and, if not assessable, why."""
    q = select(Job).options(selectinload(Job.series)).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        q = q.where(Job.state == state)
    if outcome is not None:
        q = q.where(Job.outcome == outcome)
    if series is not None:
        q = q.join(Series).where(Series.series_instance_uid == series)
    db = get(ctx).db
    live = worker_store.live_queues(db)
    with db.session() as s:
        jobs = list(s.scalars(q))
        sends = _send_states(s, [j.id for j in jobs])
        rows = [{**_row(j, live), "send": sends[j.id]} for j in jobs]
    emit(rows, COLUMNS, as_json=as_json, title="jobs", wide_columns=ALL_COLUMNS)
    if as_json:
        return
    # Beside the jobs, not as more of their columns: who runs them, and what waits why.
    waiting = [r for r in rows if r["waiting"]]
    if waiting:
        emit(waiting, ("id", "pipeline", "queue", "waiting"), as_json=False, title="waiting")
    workers = workers_view.worker_rows(db)
    if workers:
        emit(workers, workers_view.WORKER_COLUMNS, as_json=False, title="workers")


@app.command("show")
def show(ctx: typer.Context, job_id: int, as_json: JsonOpt = False) -> None:
    """One job with its findings, outputs and their transfers."""
    with get(ctx).db.session() as s:
        job = job_store.get_job(s, job_id)
        row = _row(job)
        row["send"] = _send_states(s, [job.id])[job.id]
        row["provenance"] = job.provenance
        row["findings"] = [
            {"kind": f.kind, "label": f.label, "score": (f.details or {}).get("score_name"),
             # Rounded for people as the SR and the legend say it; --json keeps it all.
             "probability": f.probability if as_json else people_probability(f.probability),
             "location": f.location, "diameter_mm": f.diameter_mm, "volume_ml": f.volume_ml}
            for f in s.scalars(select(Finding).where(Finding.job_id == job.id))]
        row["outputs"] = [
            {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": o.path,
             "transfers": [{"destination": t.destination.name, "state": t.state,
                            "attempts": t.attempts, "last_status": t.last_status,
                            "sent_at": t.sent_at, "error": t.error}
                           for t in s.scalars(select(Transfer).where(
                               Transfer.output_id == o.id))]}
            for o in s.scalars(select(Output).where(Output.job_id == job.id))]
    if as_json:
        emit([row], (), as_json=True)
        return
    emit([{"field": k, "value": v} for k, v in row.items()
          if k not in ("findings", "outputs", "provenance")], ("field", "value"), as_json=False,
         title=f"job {job_id}")
    emit(row["findings"], ("kind", "label", "score", "probability", "location", "diameter_mm",
                           "volume_ml"), as_json=False, title="findings")
    emit([{**o, "transfers": ", ".join(f"{t['destination']}: {t['state']}"
                                       for t in o["transfers"]) or "-"}
          for o in row["outputs"]], ("kind", "sop_instance_uid", "path", "transfers"),
         as_json=False, title="outputs")


@app.command("retry")
def retry(ctx: typer.Context, job_id: int, as_json: JsonOpt = False) -> None:
    """Queue a failed or cancelled job again."""
    with get(ctx).db.session() as s:
        job = job_store.retry_job(s, job_id, actor=os_actor())
        emit([_row(job)], COLUMNS, as_json=as_json)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: int, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job (a running job's result is then discarded)."""
    with get(ctx).db.session() as s:
        job = job_store.cancel_job(s, job_id, actor=os_actor())
        emit([_row(job)], COLUMNS, as_json=as_json)


def reprocess(
    ctx: typer.Context,
    series_uid: Annotated[str, typer.Argument(metavar="SERIES_UID")],
    rule: Annotated[str | None, typer.Option(
        "--rule", help="run this rule's pipeline (default: every rule that matches now)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a series again as a new job, even if it was processed before."""
    app_ctx = get(ctx)
    with app_ctx.db.session() as s:
        series = s.scalars(select(Series).options(selectinload(Series.study)).where(
            Series.series_instance_uid == series_uid)).first()
        if series is None:
            raise InputError(f"no received series {series_uid}")
        if rule is not None:
            rows = [rule_store.get_rule(s, rule)]
        else:
            current = rule_store.current_rules(s, enabled_only=True)
            specs = [rule_store.spec_of(r) for r in current]
            evs = evaluate_series(s, series, specs, app_ctx.filestore())
            rows = [r for r, ev in zip(current, evs, strict=True) if ev.matched]
            if not rows:
                raise InputError(f"no rule matches series {series_uid}; name one with --rule "
                                 "(ainode rules test --series shows why)")
        created = []
        from node.jobs.run import candidate_dir

        inf = app_ctx.config.inference
        for r in rows:
            # The version of the models the job will run: the configured folder's (or
            # the rule's candidate's), not the shipped demo packages'.
            models = candidate_dir(s, r.models) or inf.models_dir
            req = job_store.JobRequest(pipeline=r.pipeline,
                                       model_version=registry_model_version(
                                           r.pipeline, models_dir=models),
                                       rule=r, priority=r.priority, shadow=r.shadow)
            created.append(_row(job_store.reprocess_job(s, series, req, actor=os_actor())))
    emit(created, COLUMNS, as_json=as_json, title="queued")

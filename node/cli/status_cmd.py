"""``ainode status``: is the node keeping up? Queue, traffic, disk, models, turnaround."""

from __future__ import annotations

import statistics
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.cli import workers_view
from node.cli.context import get
from node.cli.output import emit
from node.heartbeat import NodeState, node_state
from node.secrets import mask_text
from storage.errors import NodeError
from storage.models import (
    AuditEvent,
    Instance,
    Job,
    JobOutcome,
    JobState,
    Series,
    Transfer,
    TransferState,
    utcnow,
)

__all__ = ["percentile", "status"]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """Whether the node is up, the last errors, queue, traffic, free disk, models.

    Up means the scheduler's heartbeat is fresh and the receivers' port answers
    (node.heartbeat); stopped and silent nodes are told apart.

    Also the last 24 h: done jobs, those of them not assessable, series skipped
    at routing as no image series, and turnaround.

    Model versions are those of the latest finished job per pipeline: the models
    are loaded in the worker processes, not in this command.
    """
    from node.quality import alert_lines, current_checks

    app_ctx = get(ctx)
    store = app_ctx.filestore()
    since = utcnow() - timedelta(days=1)
    dicom = app_ctx.config.dicom
    with app_ctx.db.session() as s:
        node = node_state(s, dicom.host, dicom.port)
        errors = last_errors(s)
        counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        last_received = s.scalar(select(func.max(Instance.received_at)))
        last_sent = s.scalar(select(func.max(Transfer.sent_at)))
        pending_sends = s.scalar(select(func.count()).select_from(Transfer).where(
            Transfer.state == TransferState.PENDING)) or 0
        turnarounds = [float(t) for t in s.scalars(select(Job.turnaround_s).where(
            Job.delivered_at >= since, Job.turnaround_s.is_not(None))) if t is not None]
        # Not assessable is a DONE job's verdict, not a failure: counted on its own so
        # a run of head CTs routed to an abdominal model shows here, not in a report.
        not_assessable = s.scalar(select(func.count()).select_from(Job).where(
            Job.state == JobState.DONE, Job.outcome == JobOutcome.NOT_ASSESSABLE)) or 0
        done_24h, not_assessable_24h = s.execute(
            select(func.count(), func.count().filter(
                Job.outcome == JobOutcome.NOT_ASSESSABLE))
            .select_from(Job).where(Job.state == JobState.DONE, Job.finished_at >= since)).one()
        skipped_24h = s.scalar(select(func.count()).select_from(Series).where(
            Series.skip_reason.is_not(None), Series.completed_at >= since)) or 0
        checks = current_checks(s)
        versions = dict(s.execute(
            select(Job.pipeline, Job.model_version).where(Job.state == JobState.DONE)
            .order_by(Job.finished_at)).all())
    info: dict[str, Any] = {
        "node": node.summary,
        "node_up": node.up,
        "last_heartbeat_at": node.last_heartbeat_at,
        # Separate `ainode worker` processes: issue 17's worker heartbeats go here.
        "workers": workers_line(node),
        "queue_depth": counts.get(JobState.QUEUED, 0),
        "running": counts.get(JobState.RUNNING, 0),
        "failed": counts.get(JobState.FAILED, 0),
        "done": counts.get(JobState.DONE, 0),
        "not_assessable": not_assessable,
        "done_24h": done_24h,
        "not_assessable_24h": not_assessable_24h,
        "series_skipped_24h": skipped_24h,
        "pending_sends": pending_sends,
        "last_received_at": last_received,
        "last_sent_at": last_sent,
        "disk_free_mb": store.free_bytes() // 2**20,
        "disk_floor_mb": app_ctx.config.storage.min_free_mb,
        # Models load in the worker processes; what they report is recorded per job.
        "model_versions": versions,
        "models": pipeline_models(app_ctx.config.inference.models_dir),
        "last_errors": errors,
        "turnaround_jobs_24h": len(turnarounds),
        "turnaround_median_s": None if not turnarounds else statistics.median(turnarounds),
        "turnaround_p95_s": percentile(turnarounds, 95),
        # Celery dispatch (issue 17): queued jobs no live worker consumes, and the workers.
        "queued_without_worker": workers_view.queued_without_worker(app_ctx.db),
        # Drift monitoring (node.quality): each group in alert at the newest check.
        "quality_alerts": alert_lines(checks),
        "quality_checked_at": max((c.checked_at for c in checks), default=None),
    }
    workers = workers_view.worker_rows(app_ctx.db)
    if as_json:
        emit([{**info, "workers": workers}], (), as_json=True)
        return
    rows = [{"item": k, "value": _shown(val)} for k, val in info.items() if k != "node_up"]
    emit(rows, ("item", "value"), as_json=False, title="ainode status")
    if workers:
        emit(workers, workers_view.WORKER_COLUMNS, as_json=False, title="workers")


def _shown(val: Any) -> Any:
    if isinstance(val, dict):
        return "; ".join(f"{p}: {v}" for p, v in val.items()) or "-"
    if isinstance(val, list):
        return "\n".join(str(v) for v in val) or "-"
    return round(val, 1) if isinstance(val, float) else val


def workers_line(node: NodeState) -> str:
    """Who runs jobs. The node's own worker is in its heartbeat; separate ``ainode
    worker`` processes are listed here once they record heartbeats of their own."""
    if not node.details:
        return "-"
    if node.details.get("run_jobs"):
        return "in-process worker of ainode serve" + ("" if node.up else " (node down)")
    return "none in ainode serve (--no-jobs): separate `ainode worker` processes run jobs"


def last_errors(session: Session, limit: int = 5) -> list[str]:
    """The newest failures the node recorded (audit outcome failure), one line each."""
    rows = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")
                           .order_by(AuditEvent.id.desc()).limit(limit))
    out = []
    for ev in rows:
        d = ev.details or {}
        why = d.get("error") or d.get("reason") or ""
        what = f" job {ev.job_id}" if ev.job_id else ""
        out.append(mask_text(f"{ev.ts.isoformat(timespec='seconds')} {ev.event}{what}"
                             + (f": {str(why)[:160]}" if why else "")))
    return out


def pipeline_models(models_dir: Path | None) -> dict[str, str]:
    """Every registered pipeline with the package each stage would load (name and version)."""
    from pipelines import registry
    from pipelines.models.package import read_manifest

    out: dict[str, str] = {}
    for name in registry.available():
        try:
            packages = registry.model_packages(name, models_dir)
        except NodeError as exc:
            out[name] = f"unavailable: {exc}"
            continue
        parts = []
        for stage, found in packages.items():
            if found is None:
                parts.append(f"{stage} (none)")
                continue
            try:
                m = read_manifest(Path(found.path))
                parts.append(f"{stage} {m.name} {m.version} ({found.source})")
            except NodeError as exc:
                parts.append(f"{stage} INVALID: {exc}")
        out[name] = ", ".join(parts) or "(no model packages declared)"
    return out

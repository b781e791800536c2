"""``ainode status``: is the node keeping up? Queue, traffic, disk, models, turnaround."""

from __future__ import annotations

import statistics
from datetime import timedelta
from typing import Annotated, Any

import typer
from sqlalchemy import func, select

from node.cli.context import get
from node.cli.output import emit
from storage.models import (
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
    """Queue depth, done and not-assessable jobs, last received and sent, free disk, models.

    Also the last 24 h: done jobs, those of them not assessable, series skipped
    at routing as no image series, and turnaround.

    Model versions are those of the latest finished job per pipeline: the models
    are loaded in the worker processes, not in this command.
    """
    app_ctx = get(ctx)
    store = app_ctx.filestore()
    since = utcnow() - timedelta(days=1)
    with app_ctx.db.session() as s:
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
        versions = dict(s.execute(
            select(Job.pipeline, Job.model_version).where(Job.state == JobState.DONE)
            .order_by(Job.finished_at)).all())
    info: dict[str, Any] = {
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
        "turnaround_jobs_24h": len(turnarounds),
        "turnaround_median_s": None if not turnarounds else statistics.median(turnarounds),
        "turnaround_p95_s": percentile(turnarounds, 95),
    }
    if as_json:
        emit([info], (), as_json=True)
        return
    rows = [{"item": k, "value": ", ".join(f"{p}={v}" for p, v in val.items()) or "-"
             if isinstance(val, dict) else (round(val, 1) if isinstance(val, float) else val)}
            for k, val in info.items()]
    emit(rows, ("item", "value"), as_json=False, title="ainode status")

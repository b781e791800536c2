"""Prometheus metrics, read from the database at scrape time.

Why from the database and not counters in memory: the C-STORE receivers,
the scheduler and job workers run in other processes (and other machines,
for remote workers); the database and its append-only audit log are what
they all share, so every node process (and a restarted one) reports the
same totals. Counts of audit events are true counters (the log only grows);
the STOW-RS request metrics are this process's own (node.web.dicomweb).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.quality import current_checks
from node.web.context import WebContext
from storage.models import AuditEvent, Destination, Instance, Job, JobState, Transfer, utcnow

__all__ = ["METRIC_NAMES", "NodeCollector"]

_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_STORE_EVENTS = {"instance.received": "success", "instance.duplicate": "duplicate",
                 "instance.conflict": "conflict", "instance.rejected": "rejected",
                 "instance.write_failed": "write_failed"}

METRIC_NAMES = (
    "ainode_instances_received_total", "ainode_stored_bytes",
    "ainode_store_outcomes_total", "ainode_series_completed_total", "ainode_jobs",
    "ainode_job_duration_seconds", "ainode_turnaround_seconds", "ainode_sends_total",
    "ainode_transfers", "ainode_disk_free_bytes", "ainode_disk_floor_bytes",
    "ainode_queue_depth", "ainode_worker_lease_seconds", "ainode_component_up",
    "ainode_stow_instances_total", "ainode_stow_request_seconds",
)


def _histogram(name: str, doc: str, values: Iterable[float]) -> HistogramMetricFamily:
    data = sorted(values)
    buckets: list[tuple[str, float]] = []
    i = 0
    for b in _DURATION_BUCKETS:
        while i < len(data) and data[i] <= b:
            i += 1
        buckets.append((str(float(b)), float(i)))
    buckets.append(("+Inf", float(len(data))))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(data)))


class NodeCollector(Collector):
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:
        ctx = self.ctx
        received = CounterMetricFamily(
            "ainode_instances_received", "Instances stored, by calling AE title "
            "(STOW-RS uploads show as STOW:<user>)", labels=["calling_ae"])
        size = GaugeMetricFamily("ainode_stored_bytes", "Bytes of received instances in "
                                 "the spool, by calling AE", labels=["calling_ae"])
        outcomes = CounterMetricFamily(
            "ainode_store_outcomes", "Store outcomes of C-STORE and STOW-RS by transport "
            "and outcome", labels=["transport", "outcome"])
        with ctx.db.session() as s:
            for actor, n in s.execute(select(AuditEvent.actor, func.count())
                                      .where(AuditEvent.event == "instance.received")
                                      .group_by(AuditEvent.actor)):
                received.add_metric([actor or ""], int(n))
            for ae, total in s.execute(select(Instance.calling_ae, func.sum(Instance.size_bytes))
                                       .group_by(Instance.calling_ae)):
                size.add_metric([ae or ""], float(total or 0))
            by_outcome: dict[tuple[str, str], int] = {}
            for event, actor, n in s.execute(
                    select(AuditEvent.event, AuditEvent.actor, func.count())
                    .where(AuditEvent.event.in_(list(_STORE_EVENTS)))
                    .group_by(AuditEvent.event, AuditEvent.actor)):
                transport = "stow" if (actor or "").startswith("STOW:") else "cstore"
                key = (transport, _STORE_EVENTS[event])
                by_outcome[key] = by_outcome.get(key, 0) + int(n)
            for (transport, outcome), n in sorted(by_outcome.items()):
                outcomes.add_metric([transport, outcome], n)
            completed = s.scalar(select(func.count()).select_from(AuditEvent)
                                 .where(AuditEvent.event == "series.completed")) or 0
            jobs = GaugeMetricFamily("ainode_jobs", "Jobs by state and pipeline",
                                     labels=["state", "pipeline"])
            queued = 0
            for state, pipeline, n in s.execute(
                    select(Job.state, Job.pipeline, func.count())
                    .group_by(Job.state, Job.pipeline)):
                jobs.add_metric([str(state), pipeline], int(n))
                if state == JobState.QUEUED:
                    queued += int(n)
            durations = [(f - st).total_seconds() for st, f in s.execute(
                select(Job.started_at, Job.finished_at).where(
                    Job.state == JobState.DONE, Job.started_at.is_not(None),
                    Job.finished_at.is_not(None))) if st is not None and f is not None]
            turnarounds = [float(t) for t in s.scalars(
                select(Job.turnaround_s).where(Job.turnaround_s.is_not(None))) if t is not None]
            sends = CounterMetricFamily("ainode_sends", "Send attempts by destination and "
                                        "outcome (sent, retry, failed)",
                                        labels=["destination", "outcome"])
            per_dest: dict[tuple[str, str], int] = {}
            for event, details in s.execute(select(AuditEvent.event, AuditEvent.details).where(
                    AuditEvent.event.in_(["transfer.sent", "transfer.retry",
                                          "transfer.failed"]))):
                key = (str((details or {}).get("destination", "")), event.split(".")[1])
                per_dest[key] = per_dest.get(key, 0) + 1
            for (dest, outcome), n in sorted(per_dest.items()):
                sends.add_metric([dest, outcome], n)
            transfers = GaugeMetricFamily("ainode_transfers", "Transfers by destination and "
                                          "state", labels=["destination", "state"])
            for name, tstate, n in s.execute(
                    select(Destination.name, Transfer.state, func.count())
                    .join(Destination, Transfer.destination_id == Destination.id)
                    .group_by(Destination.name, Transfer.state)):
                transfers.add_metric([name, str(tstate)], int(n))
            leases = GaugeMetricFamily(
                "ainode_worker_lease_seconds", "Seconds left on the lease of each running "
                "job's worker (its heartbeat renews it; negative: the worker is silent)",
                labels=["worker"])
            now = utcnow()
            for worker, expires in s.execute(select(Job.worker, Job.lease_expires_at).where(
                    Job.state == JobState.RUNNING)):
                if expires is not None:
                    leases.add_metric([worker or "?"], (expires - now).total_seconds())
            # Drift monitoring (node.quality): the newest check of each group.
            drift = GaugeMetricFamily(
                "ainode_quality_alerts", "Drift alerts at the newest quality check, by "
                "pipeline and scanner (* = all scanners); 0: in line with the reference",
                labels=["pipeline", "scanner"])
            checked = GaugeMetricFamily(
                "ainode_quality_window_jobs", "Jobs in the window of the newest quality "
                "check, by pipeline and scanner", labels=["pipeline", "scanner"])
            for check in current_checks(s):
                drift.add_metric([check.pipeline, check.scanner], float(len(check.alerts or [])))
                checked.add_metric([check.pipeline, check.scanner], float(check.n_recent))
        yield received
        yield size
        yield outcomes
        yield CounterMetricFamily("ainode_series_completed", "Series completed (stable age "
                                  "reached)", value=int(completed))
        yield jobs
        yield _histogram("ainode_job_duration_seconds", "Job run time (started to "
                         "finished) of done jobs", durations)
        yield _histogram("ainode_turnaround_seconds", "Last instance received to results "
                         "delivered", turnarounds)
        yield sends
        yield transfers
        yield GaugeMetricFamily("ainode_disk_free_bytes", "Free space where the spool is",
                                value=ctx.store.free_bytes())
        yield GaugeMetricFamily("ainode_disk_floor_bytes", "Free-space floor below which "
                                "instances are refused",
                                value=ctx.config.storage.min_free_mb * 2**20)
        yield GaugeMetricFamily("ainode_queue_depth", "Queued jobs", value=queued)
        yield leases
        yield drift
        yield checked
        up = GaugeMetricFamily("ainode_component_up", "1 when the component is alive",
                               labels=["component"])
        up.add_metric(["receivers"], 1.0 if ctx.receivers_listening() else 0.0)
        for name, alive in (ctx.workers_alive() if ctx.workers_alive else {}).items():
            up.add_metric([name], 1.0 if alive else 0.0)
        yield up

"""What the pages and the REST API show, as plain dicts: one implementation, two front doors.

Why dicts of JSON-able values: the page templates and ``/api/v1`` render the
very same result, so the API can never show something the pages do not
(and the reverse). Patient names appear only for admins (``phi=True``).
"""

from __future__ import annotations

import csv
import io
import statistics
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

import pipelines
from node.quality import current_checks
from node.web.context import WebContext
from storage.models import (
    AuditEvent,
    Destination,
    Finding,
    Instance,
    Job,
    JobOutcome,
    JobState,
    Output,
    RoutingRule,
    Series,
    Study,
    Transfer,
    TransferState,
    utcnow,
)

__all__ = [
    "audit_csv",
    "audit_events",
    "destinations",
    "job_row",
    "jobs",
    "models",
    "rules",
    "series_detail",
    "status",
    "studies",
]

SHIPPED_WEIGHTS = Path(pipelines.__file__).resolve().parent / "weights"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _hourly(session: Session, column: Any, since: datetime) -> list[datetime]:
    return [t for t in session.scalars(select(column).where(column >= since)) if t is not None]


def status(ctx: WebContext) -> dict[str, Any]:
    """The status page: liveness, queue, traffic per hour, turnaround, disk, errors, models."""
    now = utcnow()
    since = now - timedelta(days=1)
    with ctx.db.session() as s:
        counts = {str(k): int(v) for k, v in
                  s.execute(select(Job.state, func.count()).group_by(Job.state)).all()}
        pending_sends = s.scalar(select(func.count()).select_from(Transfer).where(
            Transfer.state == TransferState.PENDING)) or 0
        turnarounds = [float(t) for t in s.scalars(select(Job.turnaround_s).where(
            Job.delivered_at >= since, Job.turnaround_s.is_not(None))) if t is not None]
        inst_times = _hourly(s, Instance.received_at, since)
        series_times = _hourly(s, Series.first_received_at, since)
        errors = [{"ts": _iso(e.ts), "event": e.event, "series_uid": e.series_uid,
                   "job_id": e.job_id,
                   "error": str((e.details or {}).get("error")
                                or (e.details or {}).get("reason") or "")[:200]}
                  for e in s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")
                                     .order_by(AuditEvent.id.desc()).limit(8))]
        versions = {p: v for p, v in s.execute(
            select(Job.pipeline, Job.model_version).where(Job.state == JobState.DONE)
            .order_by(Job.finished_at)).all()}
        last_received = s.scalar(select(func.max(Instance.received_at)))
        checks = current_checks(s)
        alerts = sum(len(c.alerts or []) for c in checks)
        quality = [{"pipeline": c.pipeline, "scanner": c.scanner, "n_recent": c.n_recent,
                    "checked_at": _iso(c.checked_at), "alerts": list(c.alerts or []),
                    "reference": c.reference} for c in checks]
        recent = [{"series_uid": se.series_instance_uid, "modality": se.modality,
                   "instances": se.instance_count, "state": se.state.value,
                   "calling_ae": se.calling_ae, "last_received_at": _iso(se.last_received_at)}
                  for se in s.scalars(select(Series).order_by(Series.last_received_at.desc())
                                      .limit(6))]
    hours = []
    for h in range(23, -1, -1):
        start = now - timedelta(hours=h + 1)
        end = now - timedelta(hours=h)
        hours.append({"hour": end.strftime("%H:00"),
                      "instances": sum(1 for t in inst_times if start < t <= end),
                      "series": sum(1 for t in series_times if start < t <= end)})
    free_mb = ctx.store.free_bytes() // 2**20
    workers = ctx.workers_alive() if ctx.workers_alive is not None else {}
    return {
        "receivers_listening": ctx.receivers_listening(),
        "workers": workers,
        "queue": {st.value: counts.get(st.value, 0) for st in JobState},
        "pending_sends": int(pending_sends),
        "per_hour": hours,
        "turnaround_jobs_24h": len(turnarounds),
        "turnaround_median_s": statistics.median(turnarounds) if turnarounds else None,
        "turnaround_p95_s": _percentile(turnarounds, 95),
        "disk_free_mb": int(free_mb),
        "disk_floor_mb": ctx.config.storage.min_free_mb,
        "last_errors": errors,
        "model_versions": versions,
        "last_received_at": _iso(last_received),
        "recent_series": recent,
        # Drift monitoring (node.quality): the newest check of each pipeline and scanner.
        "quality": quality,
        "quality_alerts": alerts,
    }


def _latest_jobs(session: Session, series_ids: list[int]) -> dict[int, Job]:
    latest: dict[int, Job] = {}
    if not series_ids:
        return latest
    for job in session.scalars(select(Job).where(Job.series_id.in_(series_ids))
                               .order_by(Job.id)):
        latest[job.series_id] = job
    return latest


def studies(ctx: WebContext, *, phi: bool, limit: int = 200) -> list[dict[str, Any]]:
    """Studies, newest first, each with its series, assembly state and latest job's verdict."""
    with ctx.db.session() as s:
        rows = list(s.scalars(select(Study).options(selectinload(Study.series))
                              .order_by(Study.last_received_at.desc()).limit(limit)))
        latest = _latest_jobs(s, [se.id for st in rows for se in st.series])
        out = []
        for st in rows:
            item: dict[str, Any] = {
                "study_uid": st.study_instance_uid, "study_date": st.study_date,
                "description": st.study_description,
                "last_received_at": _iso(st.last_received_at), "series": []}
            if phi:
                item["patient_name"] = st.patient_name
                item["patient_id"] = st.patient_id
                item["accession_number"] = st.accession_number
            for se in sorted(st.series, key=lambda x: (x.series_number or 0, x.id)):
                job = latest.get(se.id)
                item["series"].append({
                    "series_uid": se.series_instance_uid, "modality": se.modality,
                    "series_number": se.series_number, "description": se.series_description,
                    "instances": se.instance_count, "state": se.state.value,
                    "skip_reason": se.skip_reason, "calling_ae": se.calling_ae,
                    "last_received_at": _iso(se.last_received_at),
                    "job": None if job is None else {
                        "id": job.id, "state": job.state.value, "pipeline": job.pipeline,
                        "outcome": job.outcome.value if job.outcome else None,
                        "reason": job.outcome_reason or job.error}})
            out.append(item)
        return out


def job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state.value, "series_uid": job.series.series_instance_uid,
        "rule": job.rule_key, "pipeline": job.pipeline, "model_version": job.model_version,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "stage": job.stage,
        "created_at": _iso(job.created_at), "finished_at": _iso(job.finished_at),
        "turnaround_s": None if job.turnaround_s is None else round(job.turnaround_s, 1),
        "outcome": job.outcome.value if job.outcome else None,
        "outcome_reason": job.outcome_reason, "error": job.error, "shadow": job.shadow,
    }


def jobs(ctx: WebContext, *, state: str | None = None, limit: int = 100
         ) -> list[dict[str, Any]]:
    q = select(Job).options(selectinload(Job.series)).order_by(Job.id.desc()).limit(limit)
    if state:
        q = q.where(Job.state == JobState(state))
    with ctx.db.session() as s:
        return [job_row(j) for j in s.scalars(q)]


def _finding(f: Finding, verdicts: dict[int, list[str]] | None = None) -> dict[str, Any]:
    return {"id": f.id, "kind": f.kind, "label": f.label, "probability": f.probability,
            "location": f.location, "diameter_mm": f.diameter_mm, "volume_ml": f.volume_ml,
            "mean_hu": f.mean_hu, "legend": (f.details or {}).get("legend"),
            # The score's name as the SR gives it, and whether the package calibrated it
            # (issue 20): the console shows the one value and says which it is.
            "score_name": (f.details or {}).get("score_name"),
            "calibrated": bool((f.details or {}).get("calibrated")),
            "verdicts": (verdicts or {}).get(f.id, [])}


def series_detail(ctx: WebContext, series_uid: str, *, phi: bool) -> dict[str, Any] | None:
    """The result page: the series, its jobs, findings, SR text and result objects."""
    with ctx.db.session() as s:
        se = s.scalars(select(Series).options(selectinload(Series.study))
                       .where(Series.series_instance_uid == series_uid)).one_or_none()
        if se is None:
            return None
        job_rows = list(s.scalars(select(Job).options(selectinload(Job.series))
                                  .where(Job.series_id == se.id).order_by(Job.id.desc())))
        out_jobs = []
        from storage.feedback import latest_references, latest_verdicts

        verdicts = latest_verdicts(s, s.scalars(select(Finding.id).join(
            Job, Finding.job_id == Job.id).where(Job.series_id == se.id)))
        ref = latest_references(s, [se.id]).get(se.id)
        for job in job_rows:
            outputs = list(s.scalars(select(Output).where(Output.job_id == job.id)))
            sends = s.execute(select(Transfer, Destination.name)
                              .join(Destination, Transfer.destination_id == Destination.id)
                              .join(Output, Transfer.output_id == Output.id)
                              .where(Output.job_id == job.id)).all()
            out_jobs.append({
                **job_row(job),
                "findings": [_finding(f, verdicts) for f in s.scalars(
                    select(Finding).where(Finding.job_id == job.id).order_by(Finding.id))],
                "outputs": [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                             "series_uid": o.series_instance_uid} for o in outputs],
                "sends": [{"destination": name, "state": t.state.value,
                           "attempts": t.attempts, "error": t.error} for t, name in sends],
                "sr_text": _sr_text(ctx, [o for o in outputs if o.kind == "SR"]),
            })
        detail: dict[str, Any] = {
            "series_uid": se.series_instance_uid, "study_uid": se.study.study_instance_uid,
            "modality": se.modality, "description": se.series_description,
            "series_number": se.series_number, "instances": se.instance_count,
            "state": se.state.value, "skip_reason": se.skip_reason,
            "calling_ae": se.calling_ae, "first_received_at": _iso(se.first_received_at),
            "completed_at": _iso(se.completed_at), "jobs": out_jobs,
            "reference": None if ref is None else {
                "diagnosis": ref.diagnosis, "positive": ref.positive, "source": ref.source,
                "at": _iso(ref.created_at)},
        }
        if phi:
            detail["patient_name"] = se.study.patient_name
            detail["patient_id"] = se.study.patient_id
        return detail


_SR_PLUMBING = {"Tracking Identifier", "Tracking Unique Identifier", "Manufacturer"}
_SR_PLUMBING_PREFIXES = ("Algorithm ", "Device Observer ")


def _sr_text(ctx: WebContext, outputs: list[Output]) -> list[str]:
    """The SR's text items, in document order (what a PACS viewer would show)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    texts: list[str] = []

    def walk(items: Any) -> None:
        for item in items or []:
            if getattr(item, "ValueType", None) == "TEXT" and "TextValue" in item:
                names = item.get("ConceptNameCodeSequence") or []
                name = str(names[0].CodeMeaning) if names else ""
                # The algorithm identification and tracking ids are for machines.
                if name not in _SR_PLUMBING and not name.startswith(_SR_PLUMBING_PREFIXES):
                    texts.append(f"{name}: {item.TextValue}" if name else str(item.TextValue))
            walk(item.get("ContentSequence"))

    for o in outputs[:1]:
        try:
            ds = pydicom.dcmread(ctx.store.result_path(o.path))
        except (OSError, InvalidDicomError):
            continue
        walk(ds.get("ContentSequence"))
    return list(dict.fromkeys(texts))  # one line per statement, in document order


def rules(ctx: WebContext) -> list[dict[str, Any]]:
    with ctx.db.session() as s:
        rows = list(s.scalars(select(RoutingRule).where(RoutingRule.is_current.is_(True))
                              .order_by(RoutingRule.priority.desc(), RoutingRule.name)))
        return [{"name": r.name, "version": r.version, "enabled": r.enabled,
                 "priority": r.priority, "conditions": r.conditions, "pipeline": r.pipeline,
                 "destinations": r.destinations, "stable_age_s": r.stable_age_s,
                 "shadow": r.shadow, "created_at": _iso(r.created_at),
                 "created_by": r.created_by} for r in rows]


def destinations(ctx: WebContext) -> list[dict[str, Any]]:
    with ctx.db.session() as s:
        sent = {(d, str(st)): int(n) for d, st, n in s.execute(
            select(Transfer.destination_id, Transfer.state, func.count())
            .group_by(Transfer.destination_id, Transfer.state)).all()}
        return [{"name": d.name, "type": d.kind, "ae_title": d.ae_title, "host": d.host,
                 "port": d.port, "url": d.url, "accepts": d.accepts, "enabled": d.enabled,
                 "source": d.source,
                 "transfers": {st.value: sent.get((d.id, str(st)), 0) for st in TransferState}}
                for d in s.scalars(select(Destination).order_by(Destination.name))]


def audit_events(ctx: WebContext, *, since: datetime | None = None,
                 until: datetime | None = None, event: str | None = None,
                 series_uid: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if since is not None:
        q = q.where(AuditEvent.ts >= since)
    if until is not None:
        q = q.where(AuditEvent.ts <= until)
    if event:
        q = q.where(AuditEvent.event.startswith(event) if event.endswith(".")
                    else AuditEvent.event == event)
    if series_uid:
        q = q.where(AuditEvent.series_uid == series_uid)
    with ctx.db.session() as s:
        return [{"id": e.id, "ts": _iso(e.ts), "event": e.event, "outcome": e.outcome,
                 "actor": e.actor, "host": e.host, "study_uid": e.study_uid,
                 "series_uid": e.series_uid, "sop_instance_uid": e.sop_instance_uid,
                 "job_id": e.job_id, "details": e.details} for e in s.scalars(q)]


def audit_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["id", "ts", "event", "outcome", "actor", "host", "study_uid", "series_uid",
            "sop_instance_uid", "job_id", "details"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "details": yaml.safe_dump(r["details"], default_flow_style=True,
                                                   width=10_000).strip()})
    return buf.getvalue()


def models(ctx: WebContext) -> list[dict[str, Any]]:
    """Model packages (the configured folder first, then the shipped ones) with their cards.

    Read from ``model.yaml`` and ``MODEL_CARD.md`` directly: the web process
    never imports torch.
    """
    roots: list[tuple[str, Path]] = [("shipped", SHIPPED_WEIGHTS)]
    if ctx.config.inference.models_dir is not None:
        roots.insert(0, ("models_dir", Path(ctx.config.inference.models_dir)))
    with ctx.db.session() as s:
        used = {(p, v) for p, v in s.execute(select(Job.pipeline, Job.model_version)
                                             .distinct()).all()}
    out = []
    for source, root in roots:
        if not root.is_dir():
            continue
        for pkg in sorted(p for p in root.iterdir() if (p / "model.yaml").is_file()):
            try:
                m = yaml.safe_load((pkg / "model.yaml").read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                m = {}
            card = pkg / "MODEL_CARD.md"
            out.append({
                "name": str(m.get("name", pkg.name)), "version": str(m.get("version", "?")),
                "task": str(m.get("task", "")), "source": source,
                "modality": str((m.get("input") or {}).get("modality", "")),
                "card": card.read_text(encoding="utf-8") if card.is_file() else "",
                # A job records its pipeline's composite model version ("a/b/c #hash"):
                # the package ran there when the pipeline is its prefix and its version is in it.
                "ran_in_jobs": sorted({p for p, v in used
                                       if str(m.get("name", pkg.name)).startswith(p)
                                       and str(m.get("version", "?")) in v.split(" ")[0]
                                       .split("/")}),
            })
    return out


def not_assessable_count(ctx: WebContext) -> int:
    with ctx.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.outcome == JobOutcome.NOT_ASSESSABLE)) or 0)

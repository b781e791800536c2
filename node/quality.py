"""Drift monitoring on the node: each job's quality record, and the recent window against
the model package's reference, by scanner.

Why on the node and not in the pipeline: which scanner a series came from, how
many jobs a window holds and whether an alert is new are the node's facts; the
statistics themselves are ``pipelines.evaluation.drift``, the same functions
``ainode evaluate`` used to write the reference, so both sides are computed
alike. The reference is the validation set the package was evaluated on; a
scanner whose inputs or whose model outputs no longer look like it is flagged,
because the figures on the model card no longer describe what it does there.

The check runs periodically in ``ainode serve`` (``qa.interval_s``) and on demand
(``ainode qa check``); each run stores one ``QualityCheck`` row per group (the
pipeline over all scanners, ``*``, and each scanner), and an alert that appears
or clears is audited. ``ainode status``, ``/metrics`` and the console read the
newest row of each group.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.config import NodeConfig, QAConfig
from pipelines import registry
from pipelines.results import AnalysisResult
from storage.audit import audit
from storage.db import Database
from storage.models import Job, QualityCheck, QualityRecord, Series, utcnow

if TYPE_CHECKING:  # scipy loads with the statistics, only when a check runs
    from pipelines.evaluation.drift import DriftReport, Thresholds

__all__ = [
    "ALL_SCANNERS",
    "GroupReport",
    "ReferenceOf",
    "alert_lines",
    "current_checks",
    "quality_report",
    "quality_row",
    "reference_from_packages",
    "run_quality_check",
    "scanner_of",
]

log = logging.getLogger(__name__)

ALL_SCANNERS = "*"
UNKNOWN = "unknown"
# (pipeline) -> (package, fitted on, records) | None
ReferenceOf = Callable[[str], "tuple[str, str, list[dict[str, Any]]] | None"]


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _number(value: Any) -> float | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def scanner_of(attributes: Mapping[str, Any]) -> str:
    """Manufacturer and model name: the group a report compares by (no identity in it)."""
    parts = [_text(attributes.get("Manufacturer")), _text(attributes.get("ManufacturerModelName"))]
    name = " ".join(p for p in parts if p)
    return name[:128] or UNKNOWN


def header_values(attributes: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The series header's descriptors: numbers that are tested, words that are listed.

    kVp and slice thickness are tested like the pipeline's own descriptors (a
    reference fitted on images without a header simply has no such column);
    kernel, contrast agent and station are categories, counted per group.
    """
    numbers = {k: v for k, v in (("kvp", _number(attributes.get("KVP"))),
                                 ("slice_thickness_mm", _number(attributes.get("SliceThickness"))))
               if v is not None}
    words = {k: v for k, v in (("kernel", _text(attributes.get("ConvolutionKernel"))),
                               ("contrast_agent", _text(attributes.get("ContrastBolusAgent"))),
                               ("station", _text(attributes.get("StationName"))),
                               ("protocol", _text(attributes.get("ProtocolName"))))
             if v}
    return numbers, {k: v[:64] for k, v in words.items()}


def quality_row(job: Job, series: Series, result: AnalysisResult, *,
                model_version: str) -> QualityRecord | None:
    """The job's quality record (None when the pipeline gives none)."""
    q = result.quality
    if q is None:
        return None
    numbers, words = header_values(series.attributes or {})
    return QualityRecord(
        job_id=job.id, series_id=series.id, pipeline=job.pipeline,
        model_version=model_version[:64], scanner=scanner_of(series.attributes or {}),
        shadow=bool(job.shadow), assessed=result.assessed,
        descriptors={**numbers, **{k: float(v) for k, v in q.descriptors.items()}},
        outputs={k: float(v) for k, v in q.outputs.items()},
        features=None if q.features is None else [float(v) for v in q.features],
        header=words,
    )


# -- the comparison -----------------------------------------------------------------------


@dataclass(slots=True)
class GroupReport:
    """One (pipeline, scanner) group's recent window against the pipeline's reference."""

    pipeline: str
    scanner: str
    n_recent: int
    reference: str | None  # "package version: fitted on", None when the package has none
    n_reference: int = 0
    drift: DriftReport | None = None
    header: dict[str, dict[str, int]] = field(default_factory=dict)  # word counts
    models: dict[str, int] = field(default_factory=dict)  # model versions in the window
    not_assessable: int = 0
    note: str = ""

    @property
    def alerts(self) -> list[str]:
        return [] if self.drift is None else list(self.drift.alerts)

    def as_dict(self) -> dict[str, Any]:
        d = self.drift
        return {
            "pipeline": self.pipeline, "scanner": self.scanner, "n_recent": self.n_recent,
            "n_reference": self.n_reference, "reference": self.reference,
            "not_assessable": self.not_assessable, "models": self.models,
            "header": self.header, "note": self.note, "alerts": self.alerts,
            "descriptors": {} if d is None else {
                k: {s: round(v, 4) for s, v in st.items()} for k, st in d.descriptors.items()},
            "feature_mmd": None if d is None or d.feature_mmd is None else round(d.feature_mmd, 5),
            "feature_mmd_p": None if d is None or d.feature_mmd_p is None
            else round(d.feature_mmd_p, 5),
            "outliers": [] if d is None else [
                {"series": s, "descriptor": k, "z": z} for s, k, z in d.outliers],
        }


def thresholds_of(qa: QAConfig) -> Thresholds:
    from pipelines.evaluation.drift import Thresholds

    return Thresholds(psi=qa.psi, ks_p=qa.ks_p, mmd_p=qa.mmd_p, outlier_z=qa.outlier_z,
                      min_window=qa.min_window)


def reference_from_packages(models_dir: Path | None) -> ReferenceOf:
    """The reference each pipeline's active packages carry (read, never built)."""
    def of(pipeline: str) -> tuple[str, str, list[dict[str, Any]]] | None:
        return registry.quality_reference(pipeline, models_dir)
    return of


def _as_record(row: QualityRecord, series_uid: str) -> dict[str, Any]:
    return {"series": series_uid, "descriptors": {**row.descriptors, **row.outputs},
            "features": row.features}


def quality_report(session: Session, qa: QAConfig, reference_of: ReferenceOf, *,
                   since: datetime, pipelines: Sequence[str] | None = None,
                   seed: int = 0) -> list[GroupReport]:
    """Every pipeline with jobs since ``since``: all scanners together, then each scanner.

    Shadow jobs are left out: they run a candidate model, whose answers say
    nothing about the active model's inputs.
    """
    stmt = (select(QualityRecord, Series.series_instance_uid)
            .join(Series, Series.id == QualityRecord.series_id)
            .where(QualityRecord.created_at >= since, QualityRecord.shadow.is_(False))
            .order_by(QualityRecord.created_at))
    if pipelines:
        stmt = stmt.where(QualityRecord.pipeline.in_(list(pipelines)))
    by_pipeline: dict[str, list[tuple[QualityRecord, str]]] = {}
    for row, uid in session.execute(stmt):
        by_pipeline.setdefault(row.pipeline, []).append((row, uid))
    from pipelines.evaluation.drift import compare

    thresholds = thresholds_of(qa)
    reports: list[GroupReport] = []
    for pipeline in sorted(by_pipeline):
        rows = by_pipeline[pipeline]
        try:
            ref = reference_of(pipeline)
        except Exception as exc:  # a broken package must not stop the other pipelines' check
            log.warning("quality reference unreadable", extra={"pipeline": pipeline,
                                                              "error": str(exc)})
            ref = None
            ref_note = f"reference unreadable: {exc}"
        else:
            ref_note = "" if ref is not None else "the model package has no drift reference"
        groups: dict[str, list[tuple[QualityRecord, str]]] = {ALL_SCANNERS: rows}
        for pair in rows:
            groups.setdefault(pair[0].scanner, []).append(pair)
        for scanner, members in groups.items():
            rep = GroupReport(pipeline, scanner, len(members),
                              None if ref is None else f"{ref[0]}: {ref[1]}",
                              note=ref_note)
            rep.not_assessable = sum(1 for row, _ in members if not row.assessed)
            rep.models = dict(Counter(row.model_version for row, _ in members))
            words: dict[str, Counter[str]] = {}
            for row, _ in members:
                for k, v in (row.header or {}).items():
                    words.setdefault(k, Counter())[str(v)] += 1
            rep.header = {k: dict(c.most_common(5)) for k, c in sorted(words.items())}
            if ref is not None:
                rep.n_reference = len(ref[2])
                rep.drift = compare(ref[2], [_as_record(r, uid) for r, uid in members],
                                    thresholds, seed=seed)
                if len(members) < qa.min_window:
                    rep.note = f"fewer than {qa.min_window} jobs: not tested"
            reports.append(rep)
    return reports


# -- the periodic check, its state and its audit -------------------------------------------


def current_checks(session: Session) -> list[QualityCheck]:
    """The newest check of each (pipeline, scanner) group: the monitoring's state now."""
    newest = (select(QualityCheck.pipeline, QualityCheck.scanner,
                     func.max(QualityCheck.id).label("id"))
              .group_by(QualityCheck.pipeline, QualityCheck.scanner).subquery())
    stmt = (select(QualityCheck).join(newest, QualityCheck.id == newest.c.id)
            .order_by(QualityCheck.pipeline, QualityCheck.scanner))
    return list(session.scalars(stmt))


def alert_lines(checks: Iterable[QualityCheck]) -> list[str]:
    """Each group in alert now, one line per alert: what status and the console show."""
    return [f"{c.pipeline} | {'all scanners' if c.scanner == ALL_SCANNERS else c.scanner}: "
            f"{a} ({c.n_recent} jobs since {c.window_days:g} d)"
            for c in checks for a in (c.alerts or [])]


def _keys(alerts: Iterable[str]) -> set[str]:
    """What an alert is about (the descriptor or "features"), not its changing numbers."""
    return {a.split(":", 1)[0] for a in alerts}


def run_quality_check(db: Database, config: NodeConfig, *,
                      reference_of: ReferenceOf | None = None,
                      now: datetime | None = None,
                      since: datetime | None = None) -> list[GroupReport]:
    """Compare the window with the references, store the state, audit what changed.

    An alert is audited when its group had no alert on that descriptor at the
    previous check, and a cleared group once; a check that finds the same alert
    again stores its row (the numbers move) without a new audit event.
    """
    qa = config.qa
    now = now or utcnow()
    since = since or now - timedelta(days=qa.window_days)
    window_days = round((now - since).total_seconds() / 86400.0, 3)
    ref = reference_of or reference_from_packages(config.inference.models_dir)
    with db.session() as s:
        reports = quality_report(s, qa, ref, since=since)
        before = {(c.pipeline, c.scanner): c for c in current_checks(s)}
        for rep in reports:
            prev = before.get((rep.pipeline, rep.scanner))
            s.add(QualityCheck(checked_at=now, pipeline=rep.pipeline, scanner=rep.scanner,
                               window_days=window_days, n_recent=rep.n_recent,
                               n_reference=rep.n_reference, reference=(rep.reference or "")[:256]
                               or None, alerts=rep.alerts, report=rep.as_dict()))
            new = _keys(rep.alerts) - _keys(prev.alerts if prev is not None else [])
            if new:
                audit(s, "qa.alert", outcome="warning", actor="ainode qa",
                      pipeline=rep.pipeline, scanner=rep.scanner, alerts=rep.alerts,
                      n_recent=rep.n_recent, window_days=window_days,
                      reference=rep.reference)
                log.warning("quality drift alert", extra={
                    "pipeline": rep.pipeline, "scanner": rep.scanner, "alerts": rep.alerts})
            elif prev is not None and prev.alerts and not rep.alerts:
                audit(s, "qa.cleared", actor="ainode qa", pipeline=rep.pipeline,
                      scanner=rep.scanner, n_recent=rep.n_recent)
        # A group with no job in the window any more clears too: nothing there drifts now.
        seen = {(r.pipeline, r.scanner) for r in reports}
        for key, prev in before.items():
            if key not in seen and prev.alerts:
                s.add(QualityCheck(checked_at=now, pipeline=key[0], scanner=key[1],
                                   window_days=window_days, n_recent=0, alerts=[],
                                   report={"note": "no job in the window"}))
                audit(s, "qa.cleared", actor="ainode qa", pipeline=key[0], scanner=key[1],
                      n_recent=0)
    return reports


def report_lines(reports: Sequence[GroupReport]) -> list[str]:
    """The report as text: one block per group, alerts first, then the statistics."""
    if not reports:
        return ["no job with a quality record in the window"]
    lines: list[str] = []
    for rep in reports:
        who = "all scanners" if rep.scanner == ALL_SCANNERS else rep.scanner
        state = f"ALERT ({len(rep.alerts)})" if rep.alerts else "ok"
        lines.append(f"{rep.pipeline} | {who}: {rep.n_recent} jobs "
                     f"({rep.not_assessable} not assessable), reference "
                     f"{rep.reference or 'none'} ({rep.n_reference} cases): {state}")
        if rep.note:
            lines.append(f"  note: {rep.note}")
        for a in rep.alerts:
            lines.append(f"  alert: {a}")
        d = rep.drift
        if d is not None and d.descriptors:
            lines.append(f"  {'descriptor':<24} {'PSI':>8} {'KS p':>10}")
            for k, st in sorted(d.descriptors.items()):
                lines.append(f"  {k:<24} {st['psi']:>8.3f} {st['ks_p']:>10.3g}")
        if d is not None and d.feature_mmd is not None:
            lines.append(f"  features: MMD^2 {d.feature_mmd:.4f}, permutation p "
                         f"{d.feature_mmd_p:.3g}")
        if d is not None and d.outliers:
            lines.append("  outlier series:")
            for uid, k, z in d.outliers[:20]:
                lines.append(f"    {uid} {k} z={z:+.1f}")
        for k, counts in rep.header.items():
            lines.append(f"  {k}: " + ", ".join(f"{v} x{n}" for v, n in counts.items()))
    return lines

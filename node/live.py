"""Live performance: the database's jobs, verdicts and references as evaluation records.

What ``ainode evaluate --live``, ``ainode models compare`` and the API's live
figures read. The maths is ``pipelines.evaluation.live``; this module only
decides which jobs count and what each finding's rating is:

* the newest DONE, assessed job of each series per model set in the window
  (a not-assessable job judged nothing; it is counted apart);
* a finding's rating is its readers' verdicts; a finding no reader saw (a
  shadow job's, kept out of PACS) takes the rating of the nearest rated
  finding of the same series within ``match_mm`` of its centre, so a
  candidate model is measured against what readers said about the same
  lesion, never against nothing. How many ratings were carried over is
  reported (``inherited``).

A model set is named ``active`` (jobs of rules without ``models``: what
readers were shown), by a candidate's name (jobs of the rule that runs it) or
by a job's exact ``model_version``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from pipelines.evaluation.live import FindingRecord, SeriesRecord, live_report, rating, summary
from storage.feedback import latest_references, latest_verdicts
from storage.models import Finding, Job, JobOutcome, JobState, ModelCandidate, RoutingRule

__all__ = ["ACTIVE", "LiveSelection", "compare", "compare_markdown", "live_figures",
           "live_markdown", "select_jobs", "write_card"]

ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class LiveSelection:
    """The jobs of one model set in a window: the newest assessed one per series."""

    name: str
    jobs: dict[int, Job]  # series id -> job
    not_assessable: int


def _centre(f: Finding) -> tuple[float, float, float] | None:
    c = (f.details or {}).get("centroid_lps_mm")
    if isinstance(c, list | tuple) and len(c) == 3:
        try:
            return float(c[0]), float(c[1]), float(c[2])
        except (TypeError, ValueError):
            return None
    return None


def _model_filter(session: Session, name: str) -> Any:
    if name == ACTIVE:
        return Job.rule_id.is_(None) | Job.rule_id.in_(
            select(RoutingRule.id).where(RoutingRule.models.is_(None)))
    cand = session.scalars(select(ModelCandidate).where(ModelCandidate.name == name)).first()
    if cand is not None:
        return Job.rule_id.in_(select(RoutingRule.id).where(RoutingRule.models == name))
    return Job.model_version == name


def select_jobs(session: Session, name: str, since: datetime) -> LiveSelection:
    q = (select(Job).where(Job.state == JobState.DONE, Job.finished_at >= since,
                           _model_filter(session, name))
         .options(selectinload(Job.findings), selectinload(Job.series))
         .order_by(Job.finished_at, Job.id))
    jobs: dict[int, Job] = {}
    declined = 0
    for job in session.scalars(q):
        if job.outcome == JobOutcome.NOT_ASSESSABLE:
            declined += 1
            jobs.pop(job.series_id, None)
            continue
        jobs[job.series_id] = job  # newest wins
    return LiveSelection(name, jobs, declined)


def _groups(job: Job) -> dict[str, str]:
    a = job.series.attributes or {}
    scanner = " ".join(str(a[k]) for k in ("Manufacturer", "ManufacturerModelName")
                       if a.get(k)).strip()
    protocol = str(a.get("ProtocolName") or job.series.series_description or "").strip()
    return {"scanner": scanner or "(unknown)", "protocol": protocol or "(unknown)"}


def _records(session: Session, sel: LiveSelection, series_ids: Sequence[int],
             match_mm: float) -> tuple[list[SeriesRecord], int]:
    """One record per series; also how many ratings were carried over from other jobs."""
    # Every region finding of these series, whichever job made it: the rated ones are
    # what a finding no reader saw can be matched to.
    all_findings = list(session.scalars(
        select(Finding).join(Job, Finding.job_id == Job.id)
        .where(Job.series_id.in_(list(series_ids)), Finding.kind != "patient",
               Finding.probability.is_not(None))))
    verdicts = latest_verdicts(session, [f.id for f in all_findings])
    rated_by_series: dict[int, list[tuple[Finding, str]]] = {}
    for f in all_findings:
        if f.id in verdicts and (r := rating(verdicts[f.id])) != "unrated":
            rated_by_series.setdefault(f.job.series_id, []).append((f, r))
    reviewed_series = {f.job.series_id for f in all_findings if f.id in verdicts}
    refs = latest_references(session, series_ids)
    inherited = 0
    recs = []
    for sid in series_ids:
        job = sel.jobs[sid]
        findings = []
        for f in job.findings:
            if f.kind == "patient" or f.probability is None:
                continue
            own = verdicts.get(f.id)
            r = rating(own) if own else "unrated"
            if not own:
                r2 = _nearest(f, rated_by_series.get(sid, []), match_mm)
                if r2 is not None:
                    r = r2  # type: ignore[assignment]
                    inherited += 1
            findings.append(FindingRecord(f.id, r, f.probability))
        ref = refs.get(sid)
        recs.append(SeriesRecord(
            job.series.series_instance_uid, tuple(findings),
            None if ref is None else ref.positive,
            reviewed=sid in reviewed_series or ref is not None, groups=_groups(job)))
    return recs, inherited


def _nearest(f: Finding, rated: list[tuple[Finding, str]], match_mm: float) -> str | None:
    c = _centre(f)
    if c is None:
        return None
    best: tuple[float, str] | None = None
    for other, r in rated:
        if other.job_id == f.job_id:
            continue
        oc = _centre(other)
        if oc is None:
            continue
        d = math.dist(c, oc)
        if d <= match_mm and (best is None or d < best[0]):
            best = (d, r)
    return None if best is None else best[1]


def live_figures(session: Session, since: datetime, *, model: str = ACTIVE,
                 n_boot: int = 1000, seed: int = 0, match_mm: float = 10.0,
                 by: Sequence[str] = ("scanner", "protocol")) -> dict[str, Any]:
    """``ainode evaluate --live``: the figures of one model set since ``since``."""
    sel = select_jobs(session, model, since)
    recs, inherited = _records(session, sel, sorted(sel.jobs), match_mm)
    report = live_report(recs, n_boot=n_boot, seed=seed, by=by)
    return {"model": model, "since": since.isoformat(), "bootstrap": n_boot,
            "not_assessable": sel.not_assessable, "inherited_ratings": inherited,
            "match_mm": match_mm, **report}


def compare(session: Session, a: str, b: str, since: datetime, *, n_boot: int = 1000,
            seed: int = 0, match_mm: float = 10.0) -> dict[str, Any]:
    """``ainode models compare``: both model sets' figures on the series both judged."""
    sa, sb = select_jobs(session, a, since), select_jobs(session, b, since)
    both = sorted(set(sa.jobs) & set(sb.jobs))
    out: dict[str, Any] = {"since": since.isoformat(), "series": len(both),
                           "bootstrap": n_boot, "match_mm": match_mm, "models": {}}
    for sel in (sa, sb):
        recs, inherited = _records(session, sel, both, match_mm)
        versions = sorted({sel.jobs[s].model_version for s in both})
        out["models"][sel.name] = {"model_versions": versions,
                                   "inherited_ratings": inherited,
                                   **summary(recs, n_boot, seed)}
    return out


def _fmt(fig: dict[str, Any]) -> str:
    v, (lo, hi) = fig["value"], fig["ci95"]
    if v is None:
        return "-"
    ci = "" if lo is None else f" ({lo:.3f}-{hi:.3f})"
    return f"{v:.3f}{ci}"


def _row(name: str, s: dict[str, Any]) -> str:
    c = s["counts"]
    return (f"| {name} | {c['series']} | {c['findings']} ({c['agreed']}/{c['disagreed']}/"
            f"{c['unrated']}) | {_fmt(s['ppv'])} | {_fmt(s['fp_per_series'])} | "
            f"{_fmt(s['sensitivity'])} | {_fmt(s['specificity'])} |")


_HEAD = ("| | series | findings (agreed/disagreed/unrated) | PPV | FP per series | "
         "sensitivity | specificity |\n|---|---|---|---|---|---|---|")


def live_markdown(report: dict[str, Any]) -> str:
    """The live figures as a Markdown table (95% bootstrap intervals in brackets)."""
    lines = [f"# Live performance: {report['model']} since {report['since'][:19]}", "",
             f"{report['bootstrap']} bootstrap replicates over series; "
             f"{report['not_assessable']} not-assessable jobs left out; "
             f"{report['inherited_ratings']} ratings carried over within "
             f"{report['match_mm']:g} mm.", "", _HEAD, _row("all", report["overall"])]
    for key, groups in report["by"].items():
        for name, s in groups.items():
            lines.append(_row(f"{key}: {name}", s))
    return "\n".join(lines) + "\n"


def compare_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Live comparison on the same {report['series']} series since "
             f"{report['since'][:19]}", "", _HEAD]
    for name, s in report["models"].items():
        lines.append(_row(name, s))
    return "\n".join(lines) + "\n"


def write_card(pkg: Path, report: dict[str, Any], text: str) -> Path:
    """Add the live figures to a model package: ``live_metrics.json`` and its card.

    Neither file is covered by the weights' hash: the figures describe the package,
    they do not change what it runs.
    """
    from pipelines.models.package import read_manifest

    read_manifest(pkg)  # refuse a folder that is not a package
    (pkg / "live_metrics.json").write_text(json.dumps(report, indent=2))
    card = pkg / "MODEL_CARD.md"
    old = card.read_text() if card.exists() else ""
    marker = "\n## Live performance"
    old = old.split(marker)[0].rstrip("\n")
    card.write_text(f"{old}\n{marker.strip()}\n\n" + text.split("\n", 2)[2])
    return card

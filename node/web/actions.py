"""What an admin changes from the console or the API, through the CLI's own functions.

Each change is made by storage.jobs / node.routing.store exactly as the CLI
makes it, in one transaction with its audit row; the actor is ``web:<user>``
so the audit log tells a console change from a shell one. NodeErrors become
HTTP errors here: 400 for refused input, 409 for a conflict, 502 for a peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from node.routing import store as rule_store
from node.routing.rules import RuleSpec
from node.web.context import WebContext
from node.web.queries import job_row
from storage import jobs as job_store
from storage.errors import ConflictError, InputError, NodeError, TransferError
from storage.models import Destination, Series
from storage.users import Principal

__all__ = ["cancel", "echo", "live", "reference", "replay", "reprocess", "retry", "save_rule",
           "set_enabled", "test_rule", "verdict"]

log = logging.getLogger(__name__)


def actor(user: Principal) -> str:
    return f"web:{user.username}"


@contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except InputError as exc:
        raise HTTPException(400, str(exc)) from exc
    except ConflictError as exc:
        raise HTTPException(409, str(exc)) from exc
    except TransferError as exc:
        raise HTTPException(502, str(exc)) from exc
    except NodeError as exc:
        raise HTTPException(500, str(exc)) from exc


def _pipelines() -> list[str]:
    from pipelines import registry

    try:
        return registry.available()
    except Exception as exc:  # a broken plug-in must not block admin work
        log.warning("pipeline registry unavailable", extra={"error": str(exc)})
        return []


def retry(ctx: WebContext, job_id: int, user: Principal) -> dict[str, Any]:
    with http_errors(), ctx.db.session() as s:
        return job_row(job_store.retry_job(s, job_id, actor=actor(user)))


def cancel(ctx: WebContext, job_id: int, user: Principal) -> dict[str, Any]:
    with http_errors(), ctx.db.session() as s:
        return job_row(job_store.cancel_job(s, job_id, actor=actor(user)))


def reprocess(ctx: WebContext, series_uid: str, rule: str | None, user: Principal
              ) -> list[dict[str, Any]]:
    """A new job for the series per matching rule (or the named one), as ``ainode reprocess``."""
    from node.jobs.run import candidate_dir
    from node.orchestration import evaluate_series, registry_model_version

    with http_errors(), ctx.db.session() as s:
        series = s.scalars(select(Series).options(selectinload(Series.study)).where(
            Series.series_instance_uid == series_uid)).first()
        if series is None:
            raise InputError(f"no received series {series_uid}")
        if rule:
            rows = [rule_store.get_rule(s, rule)]
        else:
            current = rule_store.current_rules(s, enabled_only=True)
            evs = evaluate_series(s, series, [rule_store.spec_of(r) for r in current],
                                  ctx.store)
            rows = [r for r, ev in zip(current, evs, strict=True) if ev.matched]
            if not rows:
                raise InputError(f"no rule matches series {series_uid}; name one")
        created = []
        for r in rows:
            req = job_store.JobRequest(
                pipeline=r.pipeline, rule=r, priority=r.priority, shadow=r.shadow,
                model_version=registry_model_version(
                    r.pipeline, models_dir=candidate_dir(s, r.models)
                    or ctx.config.inference.models_dir))
            created.append(job_row(job_store.reprocess_job(s, series, req, actor=actor(user))))
        return created


def _rule_dict(row: Any) -> dict[str, Any]:
    return {"name": row.name, "version": row.version, "enabled": row.enabled,
            "pipeline": row.pipeline, "conditions": row.conditions,
            "destinations": row.destinations, "priority": row.priority}


def save_rule(ctx: WebContext, name: str, when: list[str], pipeline: str,
              send_to: list[str], priority: int, enabled: bool, user: Principal
              ) -> dict[str, Any]:
    """Add the rule, or save a new version of it (the old versions stay)."""
    configured = [d.name for d in ctx.config.destinations]
    with http_errors(), ctx.db.session() as s:
        spec = RuleSpec.build(name, pipeline=pipeline, when=[w for w in when if w.strip()],
                              send_to=[d for d in send_to if d.strip()], priority=priority,
                              enabled=enabled)
        exists = any(r.name == name for r in rule_store.current_rules(s))
        if not exists:
            row = rule_store.add_rule(s, spec, actor=actor(user), pipelines=_pipelines(),
                                      configured_destinations=configured)
        else:
            row = rule_store.update_rule(
                s, name, actor=actor(user), pipelines=_pipelines(),
                configured_destinations=configured, conditions=spec.conditions,
                pipeline=spec.pipeline, destinations=spec.destinations,
                priority=spec.priority, enabled=spec.enabled)
        return _rule_dict(row)


def set_enabled(ctx: WebContext, name: str, enabled: bool, user: Principal) -> dict[str, Any]:
    configured = [d.name for d in ctx.config.destinations]
    with http_errors(), ctx.db.session() as s:
        row = rule_store.update_rule(s, name, actor=actor(user), pipelines=_pipelines(),
                                     configured_destinations=configured, enabled=enabled)
        return _rule_dict(row)


def test_rule(ctx: WebContext, name: str, series_uid: str) -> dict[str, Any]:
    """The rule against a stored series: matched or not, and the condition that failed."""
    from node.orchestration import evaluate_series

    with http_errors(), ctx.db.session() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
        if row is None:
            raise InputError(f"no received series {series_uid}")
        spec = rule_store.spec_of(rule_store.get_rule(s, name))
        (ev,) = evaluate_series(s, row, [spec], ctx.store)
        return {"series": series_uid, **ev.to_dict()}


def replay(ctx: WebContext, days: float = 7.0, limit: int = 2000) -> dict[str, Any]:
    """What the enabled rules would route among the series of the last ``days`` (runs nothing),
    as ``ainode rules replay`` does: per rule, how many series it matches."""
    from datetime import timedelta

    from node.orchestration import evaluate_series
    from storage.models import utcnow

    since = utcnow() - timedelta(days=days)
    with http_errors(), ctx.db.session() as s:
        current = rule_store.current_rules(s, enabled_only=True)
        specs = [rule_store.spec_of(r) for r in current]
        matched = dict.fromkeys((r.name for r in current), 0)
        unrouted = total = 0
        for row in s.scalars(select(Series).where(Series.last_received_at >= since)
                             .order_by(Series.last_received_at.desc()).limit(limit)):
            total += 1
            evs = evaluate_series(s, row, specs, ctx.store)
            hits = [sp.name for sp, ev in zip(specs, evs, strict=True) if ev.matched]
            for name in hits:
                matched[name] += 1
            unrouted += not hits
        return {"days": days, "series": total, "matched": matched, "unmatched": unrouted}


def echo(ctx: WebContext, name: str, user: Principal) -> dict[str, Any]:
    """C-ECHO a DICOM destination, or an HTTP probe of a DICOMweb one; audited."""
    from node.send import echo as c_echo
    from node.send.stow import probe
    from storage.audit import audit

    with ctx.db.session() as s:
        dest = s.scalars(select(Destination).where(Destination.name == name)).one_or_none()
        if dest is None:
            raise HTTPException(404, f"no destination named {name!r}")
        s.expunge(dest)
    ok, error = True, None
    try:
        if dest.kind == "dicomweb":
            probe(dest)
        else:
            c_echo(dest, ctx.config)
    except TransferError as exc:
        ok, error = False, str(exc)
    with ctx.db.session() as s:
        audit(s, "destination.echo", outcome="success" if ok else "failure",
              actor=actor(user), destination=name, error=error)
    return {"destination": name, "ok": ok, "error": error}


def verdict(ctx: WebContext, finding_id: int, value: str, comment: str | None,
            user: Principal, source: str = "web") -> dict[str, Any]:
    """A reader's verdict on a finding (any role: readers are viewers), audited."""
    from storage.feedback import record_verdict

    with http_errors(), ctx.db.session() as s:
        row = record_verdict(s, finding_id, value, reader=actor(user), comment=comment,
                             source=source)
        return {"id": row.id, "finding_id": finding_id, "verdict": row.verdict,
                "reader": row.reader}


def reference(ctx: WebContext, series_uid: str, diagnosis: str, positive: bool | None,
              comment: str | None, user: Principal) -> dict[str, Any]:
    """The reference diagnosis of a series (pathology, follow-up), audited."""
    from storage.feedback import record_reference

    with http_errors(), ctx.db.session() as s:
        row = record_reference(s, series_uid, diagnosis, reader=actor(user),
                               positive=positive, comment=comment, source="feedback")
        return {"id": row.id, "series_uid": series_uid, "diagnosis": row.diagnosis,
                "positive": row.positive, "reader": row.reader}


def live(ctx: WebContext, since: str, model: str, n_boot: int) -> dict[str, Any]:
    """The live figures ``ainode evaluate --live`` prints, for the API."""
    from node.cli.audit_cmd import parse_since
    from node.live import live_figures

    with http_errors(), ctx.db.session() as s:
        return live_figures(s, parse_since(since), model=model, n_boot=n_boot)

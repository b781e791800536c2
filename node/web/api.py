"""The REST API under /api/v1: what the pages show, as JSON, with the same roles.

Changes (retry, cancel, reprocess, rule edits) go through the same storage
and routing functions the CLI calls, audited with the web user as actor.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from node.web import actions, queries
from node.web.auth import Admin, Viewer
from node.web.context import WebContext

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["api"])


def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


@router.get("/status")
def get_status(request: Request, user: Viewer) -> dict[str, Any]:
    return queries.status(_ctx(request))


@router.get("/studies")
def get_studies(request: Request, user: Viewer,
                limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    return queries.studies(_ctx(request), phi=user.is_admin, limit=limit)


@router.get("/series/{series_uid}")
def get_series(request: Request, series_uid: str, user: Viewer) -> dict[str, Any]:
    detail = queries.series_detail(_ctx(request), series_uid, phi=user.is_admin)
    if detail is None:
        raise HTTPException(404, "no such series")
    return detail


@router.get("/jobs")
def get_jobs(request: Request, user: Viewer, state: str | None = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    try:
        return queries.jobs(_ctx(request), state=state, limit=limit)
    except ValueError as exc:
        raise HTTPException(422, f"unknown state {state!r}") from exc


@router.post("/jobs/{job_id}/retry")
def retry_job(request: Request, job_id: int, user: Admin) -> dict[str, Any]:
    return actions.retry(_ctx(request), job_id, user)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: int, user: Admin) -> dict[str, Any]:
    return actions.cancel(_ctx(request), job_id, user)


@router.post("/series/{series_uid}/reprocess")
def reprocess(request: Request, series_uid: str, user: Admin, rule: str | None = None
              ) -> list[dict[str, Any]]:
    return actions.reprocess(_ctx(request), series_uid, rule, user)


@router.get("/rules")
def get_rules(request: Request, user: Viewer) -> list[dict[str, Any]]:
    return queries.rules(_ctx(request))


class RuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: list[str] = Field(description='conditions as the CLI writes them, "Modality=CT"')
    pipeline: str
    send_to: list[str] = Field(default_factory=list)
    priority: int = 0
    enabled: bool = True


@router.post("/rules/{name}")
def put_rule(request: Request, name: str, body: RuleBody, user: Admin) -> dict[str, Any]:
    return actions.save_rule(_ctx(request), name, body.when, body.pipeline, body.send_to,
                             body.priority, body.enabled, user)


@router.post("/rules/{name}/enabled")
def enable_rule(request: Request, name: str, user: Admin, enabled: bool = True
                ) -> dict[str, Any]:
    return actions.set_enabled(_ctx(request), name, enabled, user)


@router.get("/rules/replay")
def replay_rules(request: Request, user: Viewer,
                 days: Annotated[float, Query(gt=0, le=365)] = 7.0) -> dict[str, Any]:
    return actions.replay(_ctx(request), days)


@router.get("/rules/{name}/test")
def test_rule(request: Request, name: str, series_uid: str, user: Viewer) -> dict[str, Any]:
    return actions.test_rule(_ctx(request), name, series_uid)


@router.get("/destinations")
def get_destinations(request: Request, user: Viewer) -> list[dict[str, Any]]:
    return queries.destinations(_ctx(request))


@router.post("/destinations/{name}/echo")
def echo_destination(request: Request, name: str, user: Admin) -> dict[str, Any]:
    return actions.echo(_ctx(request), name, user)


@router.get("/audit")
def get_audit(request: Request, user: Viewer, since: datetime | None = None,
              until: datetime | None = None, event: str | None = None,
              series_uid: str | None = None,
              limit: Annotated[int, Query(ge=1, le=10000)] = 200) -> list[dict[str, Any]]:
    return queries.audit_events(_ctx(request), since=since, until=until, event=event,
                                series_uid=series_uid, limit=limit)


@router.get("/audit.csv", response_class=PlainTextResponse)
def export_audit(request: Request, user: Viewer, since: datetime | None = None,
                 until: datetime | None = None, event: str | None = None,
                 series_uid: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100000)] = 10000) -> PlainTextResponse:
    rows = queries.audit_events(_ctx(request), since=since, until=until, event=event,
                                series_uid=series_uid, limit=limit)
    return PlainTextResponse(queries.audit_csv(rows), media_type="text/csv", headers={
        "Content-Disposition": 'attachment; filename="ainode-audit.csv"'})


@router.get("/models")
def get_models(request: Request, user: Viewer) -> list[dict[str, Any]]:
    return queries.models(_ctx(request))


class VerdictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: str = Field(description="agree | disagree | uncertain")
    comment: str | None = None


@router.post("/findings/{finding_id}/verdict")
def post_verdict(request: Request, finding_id: int, body: VerdictBody, user: Viewer
                 ) -> dict[str, Any]:
    """A reader's verdict; viewers may give one (readers are viewers), audited."""
    return actions.verdict(_ctx(request), finding_id, body.verdict, body.comment, user,
                           source="api")


class ReferenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    diagnosis: str = Field(description="e.g. PDAC, normal (pathology, follow-up)")
    positive: bool | None = None
    comment: str | None = None


@router.post("/series/{series_uid}/reference")
def post_reference(request: Request, series_uid: str, body: ReferenceBody, user: Viewer
                   ) -> dict[str, Any]:
    return actions.reference(_ctx(request), series_uid, body.diagnosis, body.positive,
                             body.comment, user)


@router.get("/evaluation/live")
def get_live(request: Request, user: Viewer, since: str = "90d", model: str = "active",
             bootstrap: Annotated[int, Query(ge=10, le=5000)] = 1000) -> dict[str, Any]:
    return actions.live(_ctx(request), since, model, bootstrap)


@router.get("/me")
def me(user: Viewer) -> dict[str, Any]:
    return {"username": user.username, "role": user.role.value, "via": user.via}

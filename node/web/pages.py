"""The console's pages: server-rendered Jinja2, little JavaScript, the data of node.web.queries.

Why server-rendered: the pages are read in hospital browsers that may be
old and locked down; a page that is HTML works there, and each page is the
same data the REST API returns, so nothing is computed twice.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from node.web import actions, queries
from node.web.auth import COOKIE, Admin, LoginThrottle, Viewer
from node.web.context import WebContext
from storage.errors import InputError, StorageError
from storage.models import Job, Output, Series
from storage.users import authenticate, create_session, end_session

__all__ = ["TEMPLATES", "router"]

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
TEMPLATES.env.filters["compact"] = lambda v: json.dumps(v, ensure_ascii=False,
                                                        separators=(", ", ": "), default=str)
DISCLAIMER = ("Research use only. Not a medical device: results are not for diagnosis "
              "or treatment decisions and must be checked by a qualified reader.")

router = APIRouter(include_in_schema=False)


def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def _page(request: Request, name: str, user: Any, **data: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, name, {
        "user": user, "disclaimer": DISCLAIMER, "path": request.url.path, **data})


# -- login ---------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, error: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", None, error=error)


@router.post("/login")
def login(request: Request, username: Annotated[str, Form()],
          password: Annotated[str, Form()]) -> Response:
    ctx = _ctx(request)
    throttle: LoginThrottle = request.app.state.throttle
    host = request.client.host if request.client else "?"
    keys = (f"user:{username}", f"host:{host}")
    wait = throttle.retry_after(*keys)
    if wait:
        ctx.audit_login(username, host, ok=False, via="form", event="user.login_throttled")
        resp = _page(request, "login.html", None,
                     error=f"Too many failed logins; try again in {int(wait) + 1} s.")
        resp.status_code = 429
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    with ctx.db.session() as s:
        p = authenticate(s, username, password)
        if p is not None:
            lifetime = timedelta(hours=ctx.config.web.session_hours)
            token, _ = create_session(s, p.user_id, lifetime)
    if p is None:
        throttle.failed(*keys)
        ctx.audit_login(username, host, ok=False, via="form")
        resp = _page(request, "login.html", None, error="Wrong user name or password.")
        resp.status_code = 401
        return resp
    throttle.succeeded(*keys)
    ctx.audit_login(username, host, ok=True, via="form")
    done = RedirectResponse("/", status_code=303)
    done.set_cookie(COOKIE, token, max_age=int(lifetime.total_seconds()), httponly=True,
                    samesite="strict", secure=ctx.config.web.cert_file is not None)
    return done


@router.post("/logout")
def logout(request: Request, user: Viewer) -> Response:
    ctx = _ctx(request)
    with ctx.db.session() as s:
        end_session(s, request.cookies.get(COOKIE, ""))
    ctx.audit_login(user.username, request.client.host if request.client else "?", ok=True,
                    via="form", event="user.logout")
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp


# -- reading pages ---------------------------------------------------------------------------


@router.get("/")
def status_page(request: Request, user: Viewer) -> HTMLResponse:
    data = queries.status(_ctx(request))
    peak = max([h["instances"] for h in data["per_hour"]] + [1])
    return _page(request, "status.html", user, s=data, peak=peak)


@router.get("/studies")
def studies_page(request: Request, user: Viewer) -> HTMLResponse:
    return _page(request, "studies.html", user,
                 studies=queries.studies(_ctx(request), phi=user.is_admin))


def _overlays(ctx: WebContext, series_uid: str) -> list[Path]:
    """PNGs of the series with the newest SEG's outlines, rendered once per result."""
    from node.render import render_series

    with ctx.db.session() as s:
        newest = s.scalar(select(Output.id).join(Job, Output.job_id == Job.id)
                          .join(Series, Job.series_id == Series.id)
                          .where(Series.series_instance_uid == series_uid)
                          .order_by(Output.id.desc()).limit(1))
    folder = ctx.cache_dir / series_uid / f"out-{newest or 0}"
    done = folder / ".done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        try:
            render_series(ctx.db, ctx.store, series_uid, folder)
        except (InputError, StorageError):
            return []
        done.touch()
    return sorted(folder.glob("*.png"))


@router.get("/series/{series_uid}")
def series_page(request: Request, series_uid: str, user: Viewer) -> HTMLResponse:
    ctx = _ctx(request)
    detail = queries.series_detail(ctx, series_uid, phi=user.is_admin)
    if detail is None:
        raise HTTPException(404, "no such series")
    names = [p.name for p in _overlays(ctx, series_uid)] if detail["jobs"] else []
    # Two viewers, not one: a slider through the SEG outlines and the evidence maps
    # mixed would open on whichever kind sorts in the middle, not on the lesion.
    return _page(request, "series.html", user, d=detail,
                 overlays=[n for n in names if not n.startswith("evidence_")],
                 evidence=[n for n in names if n.startswith("evidence_")])


@router.get("/series/{series_uid}/overlay/{name}")
def overlay_png(request: Request, series_uid: str, name: str, user: Viewer) -> Response:
    for p in _overlays(_ctx(request), series_uid):
        if p.name == name:
            return FileResponse(p, media_type="image/png")
    raise HTTPException(404, "no such overlay")


@router.get("/jobs")
def jobs_page(request: Request, user: Viewer, state: str | None = None) -> HTMLResponse:
    try:
        rows = queries.jobs(_ctx(request), state=state or None)
    except ValueError as exc:
        raise HTTPException(422, f"unknown state {state!r}") from exc
    return _page(request, "jobs.html", user, jobs=rows, state=state or "")


@router.get("/rules")
def rules_page(request: Request, user: Viewer, test_rule: str | None = None,
               series_uid: str | None = None) -> HTMLResponse:
    ctx = _ctx(request)
    tested = None
    if test_rule and series_uid:
        tested = actions.test_rule(ctx, test_rule, series_uid.strip())
    return _page(request, "rules.html", user, rules=queries.rules(ctx), tested=tested,
                 test_rule=test_rule or "", series_uid=series_uid or "",
                 replay=actions.replay(ctx))


@router.get("/destinations")
def destinations_page(request: Request, user: Viewer) -> HTMLResponse:
    return _page(request, "destinations.html", user,
                 destinations=queries.destinations(_ctx(request)), echo=None)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise HTTPException(422, f"not an ISO time: {value!r}") from exc
    from datetime import UTC

    return t if t.tzinfo else t.replace(tzinfo=UTC)


@router.get("/audit")
def audit_page(request: Request, user: Viewer, since: str | None = None,
               until: str | None = None, event: str | None = None,
               series_uid: str | None = None) -> HTMLResponse:
    rows = queries.audit_events(_ctx(request), since=_parse_time(since),
                                until=_parse_time(until), event=event or None,
                                series_uid=series_uid or None)
    return _page(request, "audit.html", user, events=rows, f={
        "since": since or "", "until": until or "", "event": event or "",
        "series_uid": series_uid or ""}, query=request.url.query)


@router.get("/models")
def models_page(request: Request, user: Viewer) -> HTMLResponse:
    return _page(request, "models.html", user, models=queries.models(_ctx(request)))


# -- admin forms ------------------------------------------------------------------------------


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, job_id: int, action: str, user: Admin) -> Response:
    if action == "retry":
        actions.retry(_ctx(request), job_id, user)
    elif action == "cancel":
        actions.cancel(_ctx(request), job_id, user)
    else:
        raise HTTPException(404, "no such action")
    return RedirectResponse("/jobs", status_code=303)


@router.post("/series/{series_uid}/reprocess")
def reprocess_form(request: Request, series_uid: str, user: Admin) -> Response:
    actions.reprocess(_ctx(request), series_uid, None, user)
    return RedirectResponse(f"/series/{series_uid}", status_code=303)


@router.post("/series/{series_uid}/verdict")
def verdict_form(request: Request, series_uid: str, user: Viewer,
                 finding_id: Annotated[int, Form()], verdict: Annotated[str, Form()],
                 comment: Annotated[str, Form()] = "") -> Response:
    """The result page's feedback form: a reader's verdict on one finding."""
    actions.verdict(_ctx(request), finding_id, verdict, comment.strip() or None, user)
    return RedirectResponse(f"/series/{series_uid}", status_code=303)


@router.post("/series/{series_uid}/reference")
def reference_form(request: Request, series_uid: str, user: Viewer,
                   diagnosis: Annotated[str, Form()], comment: Annotated[str, Form()] = ""
                   ) -> Response:
    actions.reference(_ctx(request), series_uid, diagnosis, None, comment.strip() or None,
                      user)
    return RedirectResponse(f"/series/{series_uid}", status_code=303)


@router.get("/rules/edit")
def rule_editor(request: Request, user: Admin, name: str | None = None) -> HTMLResponse:
    rule = next((r for r in queries.rules(_ctx(request)) if r["name"] == name), None)
    return _page(request, "rule_edit.html", user, rule=rule, error=None)


@router.post("/rules/edit")
def rule_save(request: Request, user: Admin, name: Annotated[str, Form()],
              when: Annotated[str, Form()], pipeline: Annotated[str, Form()],
              send_to: Annotated[str, Form()] = "", priority: Annotated[int, Form()] = 0,
              enabled: Annotated[bool, Form()] = False) -> Response:
    try:
        actions.save_rule(_ctx(request), name.strip(), when.splitlines(), pipeline.strip(),
                          [d.strip() for d in send_to.split(",")], priority, enabled, user)
    except HTTPException as exc:
        rule = {"name": name, "conditions": [], "when_text": when, "pipeline": pipeline,
                "destinations": [send_to], "priority": priority, "enabled": enabled}
        resp = _page(request, "rule_edit.html", user, rule=rule, error=exc.detail)
        resp.status_code = exc.status_code
        return resp
    return RedirectResponse("/rules", status_code=303)


@router.post("/rules/{name}/toggle")
def rule_toggle(request: Request, name: str, user: Admin,
                enabled: Annotated[bool, Form()] = False) -> Response:
    actions.set_enabled(_ctx(request), name, enabled, user)
    return RedirectResponse("/rules", status_code=303)


@router.post("/destinations/{name}/echo")
def destination_echo(request: Request, name: str, user: Admin) -> HTMLResponse:
    ctx = _ctx(request)
    result = actions.echo(ctx, name, user)
    return _page(request, "destinations.html", user,
                 destinations=queries.destinations(ctx), echo=result)

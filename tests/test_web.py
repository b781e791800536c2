"""The web front doors in-process: every route authenticated, roles, login, CSRF, DICOMweb.

The route table is walked, so a route added without ``viewer``/``admin``
fails here. DICOMweb runs against a real uvicorn server on loopback with
``dicomweb-client`` (a client nobody here wrote) storing, searching and
retrieving, and the STOW-RS outcomes (duplicate, conflict, missing UID, low
disk) are checked against what the C-STORE path records.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from node.config import NodeConfig
from node.web import WebContext, WebServer, create_app
from node.web.auth import admin as admin_dep
from storage import migrate, users
from storage.models import AuditEvent, Instance, UserRole
from tests.support.data import dicom_series_dir
from tests.support.net import free_port

PASSWORD = "correct horse battery"
PUBLIC = {"/healthz", "/login", "/static"}


@dataclass
class Web:
    ctx: WebContext
    client: TestClient
    data_dir: Path


def _make(tmp: Path, **storage: object) -> WebContext:
    cfg = NodeConfig(storage={"data_dir": str(tmp / "data"), "min_free_mb": 0, **storage},
                     web={"port": free_port(), "max_failed_logins": 3})
    ctx = WebContext.from_config(cfg)
    migrate.upgrade(ctx.db)
    with ctx.db.session() as s:
        users.add_user(s, "ada", PASSWORD, UserRole.ADMIN, actor="test")
        users.add_user(s, "vic", PASSWORD, UserRole.VIEWER, actor="test")
    return ctx


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    ctx = _make(tmp_path)
    with TestClient(create_app(ctx)) as client:
        yield Web(ctx, client, tmp_path / "data")
    ctx.close()
    ctx.db.dispose()


def _login(client: TestClient, user: str) -> str:
    r = client.post("/login", data={"username": user, "password": PASSWORD},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/", headers={"accept": "text/html"})
    m = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert m, "logged-in pages carry the CSRF token in their forms"
    return m.group(1)


def _uses(dependant: object, target: object) -> bool:
    deps = getattr(dependant, "dependencies", [])
    return any(d.call is target or _uses(d, target) for d in deps)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1.2.3", path)


def _routes(routes: list[Any]) -> Iterator[Any]:
    """Every route of the app, through included routers (how FastAPI nests them varies)."""
    for r in routes:
        if isinstance(r, APIRoute):
            yield r
        elif hasattr(r, "original_router"):
            yield from _routes(r.original_router.routes)
        elif isinstance(r, Route):
            yield r


def test_every_route_needs_authentication_and_admin_routes_refuse_viewers(web: Web) -> None:
    routes = list(_routes(web.client.app.routes))  # type: ignore[attr-defined]
    plain = [r.path for r in routes if not isinstance(r, APIRoute)]
    assert plain == [], f"routes outside the authenticated routers: {plain}"
    admin_routes = {(m, r.path) for r in routes for m in r.methods if _uses(r.dependant,
                                                                           admin_dep)}
    # The changes are admin's: if one of these lost its dependency the walk below would pass.
    for expected in [("POST", "/api/v1/jobs/{job_id}/retry"), ("GET", "/rules/edit"),
                     ("POST", "/rules/edit"), ("POST", "/dicomweb/studies"),
                     ("POST", "/api/v1/rules/{name}"),
                     ("POST", "/destinations/{name}/echo")]:
        assert expected in admin_routes
    walked = 0
    for r in routes:
        if r.path in PUBLIC or r.path.startswith("/static"):
            continue
        for method in r.methods:
            resp = web.client.request(method, _concrete(r.path), follow_redirects=False)
            assert resp.status_code == 401, (method, r.path, resp.status_code)
            walked += 1
    assert walked >= 30
    # A bad token is no better than none.
    assert web.client.get("/api/v1/status",
                          headers={"authorization": "Bearer nope"}).status_code == 401
    with web.ctx.db.session() as s:
        token = users.create_token(s, "vic", "walk", actor="test")
    bearer = {"authorization": f"Bearer {token}"}
    for method, path in sorted(admin_routes):
        resp = web.client.request(method, _concrete(path), headers=bearer,
                                  follow_redirects=False)
        assert resp.status_code == 403, (method, path, resp.status_code)
    assert web.client.get("/api/v1/status", headers=bearer).status_code == 200
    assert web.client.get("/healthz").status_code == 200


def test_login_failures_are_audited_and_throttled_and_forms_need_csrf(web: Web) -> None:
    c = web.client
    for _ in range(3):
        r = c.post("/login", data={"username": "ada", "password": "wrong password"})
        assert r.status_code == 401
    r = c.post("/login", data={"username": "ada", "password": PASSWORD})
    assert r.status_code == 429  # throttled even with the right password
    web.client.app.state.throttle.window_s = 0.01  # type: ignore[attr-defined]
    time.sleep(0.05)  # the window passes
    csrf = _login(c, "ada")
    with web.ctx.db.session() as s:
        events = [(e.event, e.actor) for e in s.scalars(
            sa.select(AuditEvent).where(AuditEvent.event.startswith("user.")))]
    assert events.count(("user.login_failed", "ada")) == 3
    assert ("user.login_throttled", "ada") in events and ("user.login", "ada") in events
    form = {"name": "ct", "when": "Modality=CT", "pipeline": "pancreas-ct", "send_to": "",
            "priority": "1", "enabled": "true"}
    assert c.post("/rules/edit", data=form, follow_redirects=False).status_code == 403
    r = c.post("/rules/edit", data={**form, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    rules = c.get("/api/v1/rules").json()
    assert [(x["name"], x["version"]) for x in rules] == [("ct", 1)]
    with web.ctx.db.session() as s:
        actors = set(s.scalars(sa.select(AuditEvent.actor)
                               .where(AuditEvent.event == "rule.created")))
    assert actors == {"web:ada"}
    # A viewer sees no patient names and cannot open the editor.
    c.post("/logout", data={"csrf": csrf})
    _login(c, "vic")
    assert c.get("/rules/edit", headers={"accept": "text/html"}).status_code == 403


def _files(n: int) -> list[Path]:
    return sorted(dicom_series_dir("mr_head_philips_classic").glob("*"))[:n]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[WebContext, str, str]]:
    ctx = _make(tmp_path)
    srv = WebServer(ctx)
    srv.start()
    with ctx.db.session() as s:
        token = users.create_token(s, "ada", "stow", actor="test")
    try:
        yield ctx, srv.url + "dicomweb", token
    finally:
        srv.stop()
        ctx.db.dispose()


def test_dicomweb_client_stores_searches_and_retrieves(
        server: tuple[WebContext, str, str]) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    ctx, url, token = server
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url=url, session=session)
    datasets = [pydicom.dcmread(p) for p in _files(4)]
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    result = client.store_instances(datasets)
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert sorted(stored) == sorted(d.SOPInstanceUID for d in datasets)
    # Acknowledged means durable: rows and files are there, through the C-STORE ingest path.
    with ctx.db.session() as s:
        rows = list(s.scalars(sa.select(Instance)))
        received = list(s.scalars(sa.select(AuditEvent.actor)
                                  .where(AuditEvent.event == "instance.received")))
    assert len(rows) == 4 and all(ctx.store.spool_path(r.path).stat().st_size > 0 for r in rows)
    assert received == ["STOW:ada"] * 4
    studies = client.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert "00100010" in studies[0]  # an admin's token sees the identity
    (found,) = client.search_for_series(study)
    assert found["0020000E"]["Value"] == [series]
    assert len(client.search_for_instances(study, series)) == 4
    back = client.retrieve_instance(study, series, datasets[1].SOPInstanceUID)
    assert back.SOPInstanceUID == datasets[1].SOPInstanceUID
    assert back.PixelData == datasets[1].PixelData
    assert len(client.retrieve_series(study, series)) == 4
    # A repeat of the same bytes is a success stored once.
    again = client.store_instances(datasets[:1])
    assert len(again.ReferencedSOPSequence) == 1
    metrics = session.get(url.replace("/dicomweb", "/metrics")).text
    assert 'ainode_store_outcomes_total{outcome="success",transport="stow"} 4.0' in metrics
    assert 'ainode_store_outcomes_total{outcome="duplicate",transport="stow"} 1.0' in metrics
    assert 'ainode_instances_received_total{calling_ae="STOW:ada"} 4.0' in metrics


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    b = "xyzzy-boundary"
    body = b"".join(b"--" + b.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
                    + b"\r\n" for p in parts) + b"--" + b.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={b}'


def _reasons(body: dict[str, object]) -> list[int]:
    failed = body.get("00081198") or {}
    assert isinstance(failed, dict)
    return [item["00081197"]["Value"][0] for item in failed.get("Value", [])]


def test_stow_failures_carry_the_c_store_statuses(
        server: tuple[WebContext, str, str], tmp_path: Path) -> None:
    import httpx

    ctx, url, token = server
    auth = {"Authorization": f"Bearer {token}"}
    first, second = _files(2)
    original = first.read_bytes()
    body, ctype = _multipart([original])
    assert httpx.post(f"{url}/studies", content=body, headers={**auth, "Content-Type": ctype}
                      ).status_code == 200
    # Same SOP Instance UID, other content: a conflict, kept in quarantine.
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "changed"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    # No SOP Instance UID: cannot be understood.
    ds2 = pydicom.dcmread(second)
    del ds2.SOPInstanceUID
    pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
    try:
        broken = tmp_path / "broken.dcm"
        ds2.save_as(broken)
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    body, ctype = _multipart([changed.read_bytes(), broken.read_bytes()])
    r = httpx.post(f"{url}/studies", content=body, headers={**auth, "Content-Type": ctype})
    assert r.status_code == 409
    assert sorted(_reasons(r.json())) == [0x0111, 0xC210]
    # Below the disk floor: out of resources, nothing written.
    ctx.store.min_free_bytes = 2**62
    body, ctype = _multipart([second.read_bytes()])
    r = httpx.post(f"{url}/studies", content=body, headers={**auth, "Content-Type": ctype})
    assert r.status_code == 409 and _reasons(r.json()) == [0xA700]
    with ctx.db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 1
        events = list(s.scalars(sa.select(AuditEvent.event)))
    assert {"instance.conflict", "instance.rejected"} <= set(events)
    # Not DICOM at all.
    r = httpx.post(f"{url}/studies", content=b"hello", headers={**auth,
                                                                "Content-Type": "text/plain"})
    assert r.status_code == 415


def test_admin_job_actions_through_the_api_are_audited_with_the_user(web: Web) -> None:
    from storage import jobs as job_store
    from storage.ingest import Peer
    from storage.models import Job, Series

    for p in _files(2):
        web.ctx.ingestor.ingest(p.read_bytes(), transfer_syntax_uid="1.2.840.10008.1.2.1",
                                peer=Peer("STORESCU", "127.0.0.1"))
    with web.ctx.db.session() as s:
        series = s.scalars(sa.select(Series)).one()
        job, _ = job_store.ensure_job(s, series, job_store.JobRequest("pancreas-mr", "v0"))
        job_id, series_uid = job.id, series.series_instance_uid
        token = users.create_token(s, "ada", "ops", actor="test")
    bearer = {"authorization": f"Bearer {token}"}
    c = web.client
    assert c.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer).json()["state"] == "cancelled"
    assert c.post(f"/api/v1/jobs/{job_id}/retry", headers=bearer).json()["state"] == "queued"
    assert c.post("/api/v1/jobs/999/retry", headers=bearer).status_code == 400
    listed = c.get("/api/v1/jobs", headers=bearer).json()
    assert [(j["id"], j["state"]) for j in listed] == [(job_id, "queued")]
    detail = c.get(f"/api/v1/series/{series_uid}", headers=bearer).json()
    assert detail["instances"] == 2 and detail["jobs"][0]["id"] == job_id
    (study,) = c.get("/api/v1/studies", headers=bearer).json()
    assert "patient_name" in study  # an admin sees identities ...
    with web.ctx.db.session() as s:
        vtoken = users.create_token(s, "vic", "ro", actor="test")
        actors = {(e.event, e.actor) for e in s.scalars(
            sa.select(AuditEvent).where(AuditEvent.job_id == job_id))}
        assert s.get(Job, job_id) is not None
    (vstudy,) = c.get("/api/v1/studies", headers={"authorization": f"Bearer {vtoken}"}).json()
    assert "patient_name" not in vstudy  # ... a viewer does not
    assert {("job.cancelled", "web:ada"), ("job.retried", "web:ada")} <= actors, actors
    csv = c.get(f"/api/v1/audit.csv?series_uid={series_uid}", headers=bearer)
    assert csv.status_code == 200 and csv.text.startswith("id,ts,event")
    assert "job.cancelled" in csv.text


def test_users_cli_add_list_reset_token_remove(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from node.cli import app, exit_code
    from storage.db import Database
    from storage.errors import NodeError

    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")},
                                   "logging": {"level": "WARNING"}}))

    def run(*args: str, given: str | None = None) -> tuple[int, str]:
        r = CliRunner().invoke(app, ["--config", str(cfg), *args], input=given)
        if isinstance(r.exception, NodeError):
            return exit_code(r.exception), str(r.exception)
        return r.exit_code, r.output

    code, out = run("users", "add", "ops", "--role", "admin", "--generate")
    assert code == 0 and "password: " in out
    first = out.split("password: ")[1].split()[0]
    code, out = run("users", "add", "reader", given="a long password\na long password\n")
    assert code == 0, out
    assert run("users", "add", "shorty", given="short\nshort\n")[0] == 2
    assert run("users", "add", "ops", "--generate")[0] == 2  # taken
    code, out = run("users", "list", "--json")
    assert code == 0 and '"role": "admin"' in out and '"reader"' in out
    assert "password" not in out.replace("password_changed_at", "")
    code, out = run("users", "reset", "ops", "--generate")
    second = out.split("password: ")[1].split()[0]
    code, token = run("users", "token", "reader", "--name", "prometheus")
    assert code == 0 and token.strip().startswith("ain_")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'ainode.db'}")
    try:
        with db.session() as s:
            assert users.authenticate(s, "ops", first) is None
            assert users.authenticate(s, "ops", second) is not None
            assert users.by_token(s, token.strip()) is not None
        assert run("users", "remove", "reader")[0] == 0
        assert run("users", "remove", "reader")[0] == 2
        with db.session() as s:
            assert users.by_token(s, token.strip()) is None  # its tokens went with it
            events = list(s.scalars(sa.select(AuditEvent.event)
                                    .where(AuditEvent.event.startswith("user."))
                                    .order_by(AuditEvent.id)))
    finally:
        db.dispose()
    assert events == ["user.added", "user.added", "user.password_reset",
                      "user.token_created", "user.removed"]


def test_stow_and_qido_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """The same STOW-RS and QIDO-RS on PostgreSQL (its string_agg, not SQLite's group_concat)."""
    ctx = _make(tmp_path, database_url=postgres_url)
    try:
        with TestClient(create_app(ctx)) as c:
            with ctx.db.session() as s:
                token = users.create_token(s, "ada", "pg", actor="t")
            bearer = {"authorization": f"Bearer {token}"}
            body, ctype = _multipart([p.read_bytes() for p in _files(3)])
            r = c.post("/dicomweb/studies", content=body,
                       headers={**bearer, "content-type": ctype})
            assert r.status_code == 200, r.text
            (study,) = c.get("/dicomweb/studies", headers=bearer).json()
            assert study["00201208"]["Value"] == [3] and study["00080061"]["Value"] == ["MR"]
            assert c.get("/metrics", headers=bearer).status_code == 200
    finally:
        ctx.close()
        ctx.db.dispose()

"""The FastAPI application: routers for pages, /api/v1, /dicomweb, and health and metrics.

Layout as FastAPI's "bigger applications": one router per front door,
authentication and the node's context as dependencies (node.web.auth,
``app.state.ctx``), templates beside the pages that render them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY as PROCESS_REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from node import __version__
from node.web import api, dicomweb, pages
from node.web.auth import LoginThrottle, Viewer
from node.web.context import WebContext
from node.web.metrics import NodeCollector

__all__ = ["create_app"]


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(title="dicom-ai-node", version=__version__,
                  description="Console, REST API and DICOMweb of the node (research use "
                  "only, not a medical device).", docs_url=None, openapi_url=None,
                  redoc_url=None)
    app.state.ctx = ctx
    web = ctx.config.web
    app.state.throttle = LoginThrottle(web.max_failed_logins, web.failed_login_window_s)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ctx))
    app.state.registry = registry

    app.include_router(pages.router)
    app.include_router(api.router)
    app.include_router(dicomweb.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")),
              name="static")

    # FastAPI's own docs routes would be served to anyone: these are the same, logged in.
    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(user: Viewer) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/docs", include_in_schema=False)
    def docs(user: Viewer) -> Response:
        return get_swagger_ui_html(openapi_url="/api/openapi.json",
                                   title="dicom-ai-node API")

    @app.get("/healthz", include_in_schema=True, tags=["health"])
    def healthz() -> dict[str, str]:
        """Alive: the process answers. The only route served without authentication."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(user: Viewer) -> Response:
        """Ready: database reachable, disk above the floor, DICOM receivers listening."""
        checks: dict[str, Any] = {}
        try:
            with ctx.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = True
        except SQLAlchemyError:
            checks["database"] = False
        free_mb = ctx.store.free_bytes() // 2**20
        checks["disk"] = free_mb >= ctx.config.storage.min_free_mb
        checks["disk_free_mb"] = int(free_mb)
        checks["receivers"] = ctx.receivers_listening()
        ready = checks["database"] and checks["disk"] and checks["receivers"]
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics(user: Viewer) -> Response:
        """Prometheus text format: the node's totals from the database, and this process's."""
        body = generate_latest(registry) + generate_latest(PROCESS_REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 401 and headers.get("Location") == "/login":
            return RedirectResponse("/login", status_code=303)
        if "text/html" in request.headers.get("accept", "") and not request.url.path.startswith(
                ("/api/", "/dicomweb")):
            return pages.TEMPLATES.TemplateResponse(
                request, "error.html", {"user": getattr(request.state, "principal", None),
                                        "code": exc.status_code, "detail": exc.detail,
                                        "disclaimer": pages.DISCLAIMER, "path": ""},
                status_code=exc.status_code, headers=headers or None)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        # Authentication runs before body validation only for declared dependencies; a
        # request that is both unauthenticated and malformed must still not learn more.
        return JSONResponse({"detail": "invalid request", "errors": exc.errors()[:5]},
                            status_code=422)

    return app

"""``ainode web``: the console, REST API, DICOMweb and /metrics on their own.

Why on its own: a node whose receivers run elsewhere (or a read-only
console beside a busy node) serves the same pages from the same database;
``ainode serve`` serves them too when ``web.enabled`` is set.
"""

from __future__ import annotations

from typing import Annotated

import typer

from node.cli.context import get

__all__ = ["web"]


def web(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option("--port", help="default: web.port")] = None,
    host: Annotated[str | None, typer.Option("--host", help="default: web.host")] = None,
) -> None:
    """Serve the web console and APIs until Ctrl-C."""
    from node.web import WebContext, WebServer
    from storage import migrate

    app_ctx = get(ctx)
    config = app_ctx.config
    if port is not None:
        config.web.port = port
    if host is not None:
        config.web.host = host
    wctx = WebContext.from_config(config)
    migrate.upgrade(wctx.db)
    server = WebServer(wctx)
    typer.echo(f"ainode web console on {server.url}", err=True)
    try:
        server.run()
    finally:
        wctx.close()

"""``ainode serve``: run the node until SIGTERM or SIGINT.

Why the signal handlers only set an event: the shutdown itself (stop
accepting, let stores in flight finish, stop the workers and the scheduler)
runs on the main thread, never inside a signal handler.
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from node.cli.context import get
from node.network.pool import default_workers
from node.service import NodeService

__all__ = ["serve"]


def serve(
    ctx: typer.Context,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, max=16,
                     help="receiver processes (default: one per core, at most 8)"),
    ] = None,
    no_jobs: Annotated[
        bool,
        typer.Option("--no-jobs", help="do not run jobs here; separate `ainode worker` "
                     "processes (e.g. on GPU machines) claim them from the database"),
    ] = False,
) -> None:
    """Receive DICOM, assemble and route series, run jobs and send results until stopped."""
    app = get(ctx)
    service = NodeService(app.config, workers=workers or default_workers(),
                          run_jobs=not no_jobs)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    typer.echo(
        f"ainode listening on {app.config.dicom.host}:{service.port} as "
        f"{app.config.dicom.ae_title} ({service.workers} receiver process(es))", err=True,
    )
    if service.web is not None:
        typer.echo(f"ainode web console on {service.web.url}", err=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
    typer.echo("ainode stopped", err=True)

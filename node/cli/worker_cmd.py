"""``ainode worker``: the job runner as its own process (one per device, any number of hosts)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from node.cli.context import get
from node.worker import Worker
from storage import migrate

__all__ = ["worker"]

log = logging.getLogger(__name__)


def worker(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="run the queued jobs, then exit")] = False,
    concurrency: Annotated[int | None, typer.Option(
        help="jobs at a time (default: inference.max_jobs_per_device)", min=1, max=64)] = None,
    lease: Annotated[float, typer.Option(
        help="seconds a claim lasts without a heartbeat", min=1.0)] = 60.0,
    poll: Annotated[float, typer.Option(help="seconds between queue polls", min=0.1)] = 2.0,
) -> None:
    """Claim and run pipeline jobs until stopped (SIGTERM/SIGINT)."""
    app_ctx = get(ctx)
    # A worker host booted with (or before) the database server waits for it, as serve does.
    migrate.wait_until_reachable(app_ctx.raw_db, app_ctx.config.storage.database_wait_s)
    w = Worker(app_ctx.db, app_ctx.filestore(), app_ctx.config, lease_s=lease,
               concurrency=concurrency)
    recovered = w.recover()
    typer.echo(f"worker {w.name} on {w.device}, {w.concurrency} slot(s); "
               f"requeued {len(recovered)} orphaned job(s)", err=True)
    if once:
        ran = w.run_available()
        typer.echo(f"ran {ran} job(s)", err=True)
        return
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("worker stopping", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    w.serve(stop, poll_s=poll)

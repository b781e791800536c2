"""``ainode worker``: the job runner as its own process (one per device, any number of hosts)."""

from __future__ import annotations

import logging
import re
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from node.cli.context import AppContext, get
from node.worker import Worker
from storage import jobs as job_store
from storage import migrate
from storage import workers as worker_rows
from storage.errors import InputError

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
    celery: Annotated[bool, typer.Option(
        "--celery", help="take jobs from the broker (queue.broker_url) instead of polling "
        "the database")] = False,
    queues: Annotated[str, typer.Option(
        help="with --celery: the queues to consume, comma-separated (cpu, gpu, or a "
        "pipeline's own queue)")] = "cpu",
    device: Annotated[str | None, typer.Option(
        help="with --celery: the device jobs run on (cpu, cuda, cuda:N; default: "
        "inference.device)")] = None,
) -> None:
    """Claim and run pipeline jobs until stopped (SIGTERM/SIGINT)."""
    app_ctx = get(ctx)
    # A worker host booted with (or before) the database server waits for it, as serve does.
    migrate.wait_until_reachable(app_ctx.raw_db, app_ctx.config.storage.database_wait_s)
    if celery:
        _celery_worker(app_ctx, queues, device, concurrency)
        return
    name = job_store.new_worker_id()
    w = Worker(app_ctx.db, app_ctx.filestore(), app_ctx.config, name=name, lease_s=lease,
               concurrency=concurrency, current=worker_rows.CurrentJobs(app_ctx.db, name))
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
    # Its own row, as a Celery worker has (ainode status): what it runs, that it lives.
    worker_rows.register(app_ctx.db, name, kind="polling", device=w.device, queues=[])
    worker_rows.heartbeat_forever(app_ctx.db, name, stop)
    try:
        w.serve(stop, poll_s=poll)
    finally:
        worker_rows.set_stopped(app_ctx.db, name)


def _celery_worker(app_ctx: AppContext, queues: str, device: str | None,
                   concurrency: int | None) -> None:
    from node.queue.worker import run_celery_worker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise InputError("--queues names no queue")
    if device is not None and not re.match(r"^(cpu|cuda(:\d+)?)$", device):
        raise InputError(f"--device {device!r}: cpu, cuda or cuda:N")
    config = app_ctx.config
    typer.echo(f"celery worker for queue(s) {', '.join(names)} on "
               f"{device or config.inference.device}", err=True)
    run_celery_worker(config, app_ctx.db, app_ctx.filestore(), queues=names, device=device,
                      concurrency=concurrency, loglevel=config.logging.level)

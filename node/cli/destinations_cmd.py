"""``ainode destinations``: the PACS the node sends results to; add, list, remove, echo.

The config file's destinations are synced into the table first, so the list
always shows what the sender will use. Refused input (a bad AE title, an
unknown kind, a taken name) is a one-line message and exit code 2.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from node.cli.context import AppContext, get
from node.cli.output import emit
from node.config import DestinationConfig, default_accepts
from node.send import echo as send_echo
from pipelines.dicom_out import registry as writers
from storage import destinations as dest_store
from storage.audit import audit, os_actor
from storage.errors import ConflictError, InputError, TransferError

__all__ = ["app"]

app = typer.Typer(help="Where results are sent (DICOM peers).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _sync(actx: AppContext) -> None:
    with actx.db.session() as s:
        dest_store.sync_from_config(s, actx.config.destinations, actor=os_actor())


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="a short name: letters, digits, _ . -")],
    ae_title: Annotated[str, typer.Option("--ae-title", help="the peer's AE title")],
    host: Annotated[str, typer.Option("--host")],
    port: Annotated[int, typer.Option("--port")],
    accepts: Annotated[str | None, typer.Option(
        "--accepts", help="comma-separated result kinds it takes, e.g. SEG,SR,GSPS,SC "
                          "(default: the kinds written by default)")] = None,
    calling_ae_title: Annotated[str | None, typer.Option(
        "--calling-ae-title", help="AE title we present (default: dicom.ae_title)")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="use TLS (dicom.tls files)")] = False,
) -> None:
    """Add a destination."""
    actx = get(ctx)
    wanted = accepts.split(",") if accepts is not None else default_accepts()
    kinds = dest_store.validate_accepts(wanted, kinds=writers.kinds())
    try:
        cfg = DestinationConfig(name=name, ae_title=ae_title, host=host, port=port,
                                accepts=kinds, calling_ae_title=calling_ae_title,  # type: ignore[arg-type]
                                tls=tls)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                         for e in exc.errors())
        raise InputError(f"invalid destination: {msgs}") from exc
    _sync(actx)
    try:
        with actx.db.session() as s:
            dest_store.add(s, cfg, actor=os_actor())
    except ConflictError as exc:
        raise InputError(str(exc)) from exc
    typer.echo(f"destination {name} added: {ae_title}@{host}:{port} accepts {','.join(kinds)}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List destinations (from the config file and added here)."""
    actx = get(ctx)
    _sync(actx)
    with actx.db.session() as s:
        rows: list[dict[str, Any]] = [
            {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port,
             "accepts": ",".join(d.accepts), "tls": d.tls, "source": d.source,
             "enabled": d.enabled}
            for d in dest_store.list_all(s)
        ]
    emit(rows, ["name", "ae_title", "host", "port", "accepts", "tls", "source", "enabled"],
         as_json=as_json, title="destinations")


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove a destination added on the command line."""
    actx = get(ctx)
    _sync(actx)
    with actx.db.session() as s:
        dest_store.remove(s, name, actor=os_actor())
    typer.echo(f"destination {name} removed")


@app.command("echo")
def echo(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """C-ECHO one destination; exit 0 when it answers, 1 when it cannot be reached."""
    actx = get(ctx)
    _sync(actx)
    with actx.db.session() as s:
        dest = dest_store.by_name(s, name)
        if dest is None:
            raise InputError(f"no destination named {name!r}")
        s.expunge(dest)
    try:
        send_echo(dest, actx.config)
    except TransferError as exc:
        with actx.db.session() as s:
            audit(s, "destination.echo", outcome="failure", actor=os_actor(),
                  destination=name, error=str(exc))
        raise
    with actx.db.session() as s:
        audit(s, "destination.echo", actor=os_actor(), destination=name)
    typer.echo(f"{name}: C-ECHO succeeded ({dest.ae_title}@{dest.host}:{dest.port})")

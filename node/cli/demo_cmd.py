"""``ainode demo``: the node's main job on the embedded default, start to finish."""

from __future__ import annotations

from pathlib import Path

import typer

from node.cli.context import get
from storage import migrate


def demo(
    ctx: typer.Context,
    series: Path | None = typer.Option(None, "--series", help="folder of DICOM files to send"),
) -> None:
    """Run the node end to end on the embedded default and print what happened."""
    app = get(ctx)
    cfg = app.config
    rev = migrate.upgrade(app.db)
    store = app.filestore()
    typer.echo(f"database  {app.db.safe_url} (schema {rev})")
    typer.echo(f"spool     {store.spool}")
    typer.echo(f"results   {store.results}")
    typer.echo(f"free      {store.free_bytes() // 2**20} MB (floor {cfg.storage.min_free_mb} MB)")
    typer.echo(f"dicom     AE {cfg.dicom.ae_title} on {cfg.dicom.host}:{cfg.dicom.port}")
    if series is not None:
        typer.echo(f"series    {series} (sending needs the receiver; not built yet)")

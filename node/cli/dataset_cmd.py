"""``ainode dataset export``: reader-segmented cases -> a de-identified MSD training set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.context import get
from storage.audit import os_actor

__all__ = ["app"]

app = typer.Typer(help="Training sets from the node's own cases.", no_args_is_help=True)


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="a new folder (MSD layout)")],
    diagnoses: Annotated[Path | None, typer.Option(
        "--diagnoses", help="CSV series_uid,diagnosis for series without a recorded "
        "reference")] = None,
    with_dicom: Annotated[bool, typer.Option(
        "--with-dicom", help="also the de-identified DICOM instances")] = False,
) -> None:
    """Series with a reader's SEG and a reference diagnosis, de-identified (gdcmanon)."""
    from node.dataset import export_dataset

    app_ctx = get(ctx)
    summary = export_dataset(app_ctx.db, app_ctx.filestore(), app_ctx.config, out,
                             diagnoses_csv=diagnoses, with_dicom=with_dicom,
                             actor=os_actor())
    for uid, why in sorted(summary.skipped.items()):
        typer.echo(f"skipped {uid}: {why}", err=True)
    typer.echo(f"exported {len(summary.cases)} cases to {out}; the UID/ID mapping stays in "
               f"{summary.mapping}")

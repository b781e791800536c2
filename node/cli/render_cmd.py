"""``ainode render SERIES_UID --out DIR``: PNGs of what the radiologist will see."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.cli.context import get

__all__ = ["render"]


def render(
    ctx: typer.Context,
    series_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of a received series")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG files")],
    all_slices: Annotated[bool, typer.Option(
        "--all", help="every slice, not only those with an outline")] = False,
) -> None:
    """Write PNG slices of a series with the segmentation outline and the finding text."""
    from node.render import render_series  # heavy imports only when the command runs

    actx = get(ctx)
    written = render_series(actx.db, actx.filestore(), series_uid, out, all_slices=all_slices)
    typer.echo(f"{len(written)} PNG file(s) written to {out}")

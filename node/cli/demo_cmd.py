"""``ainode demo``: the node's main job on the embedded default, PACS to PACS."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from node.cli.context import get


def demo(
    ctx: typer.Context,
    series: Annotated[Path | None, typer.Option(
        "--series", help="folder of DICOM files of one series (default: a synthetic phantom CT "
        "with a lesion)")] = None,
    timeout_s: Annotated[float, typer.Option(
        "--timeout", help="seconds to wait for the results", min=10)] = 1800.0,
    console: Annotated[bool, typer.Option(
        "--console/--no-console", help="then serve the web console until Ctrl-C "
        "(default: when the output is a terminal)")] = sys.stdout.isatty(),
) -> None:
    """Send a CT study through a local PACS to the node and back; print what happened."""
    from node.demo import print_report, run_demo  # heavy imports only when it runs

    app = get(ctx)
    report = run_demo(app.config, series_dir=series, say=typer.echo, timeout_s=timeout_s)
    print_report(report, say=typer.echo)
    if report.job_state != "done":
        raise typer.Exit(1)
    from node.web.demo_console import console_config, offer_console

    offer_console(console_config(app.config, report.node_dir), typer.echo, serve=console,
                  series_uid=report.series_uid)

"""``ainode qa``: drift monitoring, the recent jobs against the model package's reference.

``report`` only reads and prints (by pipeline, all scanners and then each
scanner); ``check`` is what ``ainode serve`` runs every ``qa.interval_s``: it
stores each group's state for ``ainode status``, /metrics and the console and
audits an alert that appears or clears, and exits 1 while any group is in alert
so that a cron job or a monitoring probe can use it.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.cli.audit_cmd import parse_since
from node.cli.context import get

__all__ = ["app"]

app = typer.Typer(help="Drift monitoring: recent inputs and outputs against the models' "
                  "reference.", no_args_is_help=True)

SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="window start, e.g. 30d, 12h or an ISO date (default: qa.window_days)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


@app.command("report")
def report(ctx: typer.Context, since: SinceOpt = None,
           pipeline: Annotated[list[str] | None, typer.Option(
               "--pipeline", help="only this pipeline (repeatable)")] = None,
           scanner: Annotated[str | None, typer.Option(
               "--scanner", help="only this scanner (manufacturer and model)")] = None,
           as_json: JsonOpt = False) -> None:
    """Compare the window with each pipeline's reference, by scanner; nothing is stored."""
    from node.quality import quality_report, reference_from_packages, report_lines

    app_ctx = get(ctx)
    config = app_ctx.config
    start = parse_since(since or f"{config.qa.window_days}d")
    with app_ctx.db.session() as s:
        reports = quality_report(s, config.qa,
                                 reference_from_packages(config.inference.models_dir),
                                 since=start, pipelines=pipeline)
    if scanner is not None:
        reports = [r for r in reports if r.scanner == scanner]
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in reports], indent=2))
        return
    typer.echo(f"window since {start.isoformat(timespec='seconds')}")
    for line in report_lines(reports):
        typer.echo(line)


@app.command("check")
def check(ctx: typer.Context, since: SinceOpt = None, as_json: JsonOpt = False) -> None:
    """Run the periodic check now: store the state, audit alerts; exit 1 while any alerts."""
    from node.quality import report_lines, run_quality_check

    app_ctx = get(ctx)
    start = None if since is None else parse_since(since)
    reports = run_quality_check(app_ctx.db, app_ctx.config, since=start)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for line in report_lines(reports):
            typer.echo(line)
    alerts = sum(1 for r in reports if r.alerts)
    if alerts:
        typer.echo(f"{alerts} group(s) in alert (audited as qa.alert)", err=True)
        raise typer.Exit(1)

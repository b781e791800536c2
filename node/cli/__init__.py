"""The ``ainode`` command line: the only place that configures logging and exits.

Every command takes the global ``--config FILE`` (or the embedded defaults),
prints tables by default and JSON with ``--json``, and turns a NodeError into
a one-line message and an exit code: 2 for refused input or configuration, 1
for a failure while doing the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from node import __version__
from node.cli import (
    audit_cmd,
    config_cmd,
    db_cmd,
    demo_cmd,
    destinations_cmd,
    evaluate_cmd,
    jobs_cmd,
    models_cmd,
    render_cmd,
    rules_cmd,
    serve_cmd,
    status_cmd,
    studies_cmd,
    train_cmd,
    worker_cmd,
)
from node.cli.context import AppContext
from storage.errors import ConfigError, InputError, NodeError

__all__ = ["app", "main"]

app = typer.Typer(
    name="ainode",
    help="dicom-ai-node: a PACS-integrated DICOM AI node (research use, not a medical device).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(db_cmd.app, name="db")
app.add_typer(config_cmd.app, name="config")
app.command("demo")(demo_cmd.demo)
app.command("serve")(serve_cmd.serve)
app.add_typer(studies_cmd.studies_app, name="studies")
app.add_typer(studies_cmd.series_app, name="series")
app.add_typer(rules_cmd.app, name="rules")
app.add_typer(jobs_cmd.app, name="jobs")
app.command("reprocess")(jobs_cmd.reprocess)
app.add_typer(audit_cmd.app, name="audit")
app.command("status")(status_cmd.status)
app.command("worker")(worker_cmd.worker)
app.add_typer(destinations_cmd.app, name="destinations")
app.command("render")(render_cmd.render)
app.add_typer(models_cmd.app, name="models")
app.command("train")(train_cmd.train)
app.command("train-demo")(train_cmd.train_demo)
app.command("evaluate")(evaluate_cmd.evaluate)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ainode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config file (default: embedded defaults)",
                     envvar="AINODE_CONFIG", exists=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = AppContext(config_path=config)


def exit_code(exc: NodeError) -> int:
    return 2 if isinstance(exc, ConfigError | InputError) else 1


def main() -> None:
    try:
        app()
    except NodeError as exc:
        typer.echo(f"ainode: error: {exc}", err=True)
        sys.exit(exit_code(exc))

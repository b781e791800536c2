"""The ``ainode`` command line: the only place that configures logging and exits.

Every command takes ``--config FILE`` (or the embedded defaults), before or
after its name (``ainode --config F serve`` and ``ainode serve --config F``
both work: users type either), prints tables by default and JSON with
``--json``, and turns a NodeError into
a one-line message and an exit code: 2 for refused input or configuration, 1
for a failure while doing the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from sqlalchemy.exc import SQLAlchemyError
from typer.core import TyperGroup

from node import __version__
from node.cli import (
    audit_cmd,
    calibrate_cmd,
    config_cmd,
    dataset_cmd,
    db_cmd,
    demo_cmd,
    destinations_cmd,
    evaluate_cmd,
    feedback_cmd,
    jobs_cmd,
    models_cmd,
    qa_cmd,
    render_cmd,
    rules_cmd,
    serve_cmd,
    status_cmd,
    studies_cmd,
    train_cmd,
    users_cmd,
    web_cmd,
    worker_cmd,
)
from node.cli.context import AppContext
from node.cli.context import get as get_context
from node.secrets import mask_text
from storage.errors import ConfigError, InputError, NodeError
from storage.migrate import db_reason

__all__ = ["app", "main"]

_CONFIG_HELP = "YAML config file (default: embedded defaults)"


def _late_config(ctx: typer.Context, value: Path | None) -> None:
    """``--config`` after a command name: the same setting as before it.

    The root callback has run by now (click invokes a group before parsing its
    subcommand), so the AppContext exists and nothing has loaded the config yet.
    A file given on the command line wins over AINODE_CONFIG; two different
    files on one command line are a usage error, not a silent choice.
    """
    if value is None:
        return
    app_ctx = get_context(ctx)
    if app_ctx.config_explicit and app_ctx.config_path != value:
        raise typer.BadParameter(
            f"given twice with different files ({app_ctx.config_path}, {value})")
    app_ctx.config_path = value
    app_ctx.config_explicit = True


def _config_option() -> Any:
    """A fresh ``--config`` option, built by typer itself from a one-parameter command.

    Why this way: typer has no option shared by all commands, and its click is
    vendored, so an option made by hand would not fit its contexts.
    """
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(config: Annotated[Path | None, typer.Option(
            "--config", "-c", callback=_late_config,
            help=f"{_CONFIG_HELP}; also accepted before the command")] = None) -> None:
        pass

    (option,) = [p for p in typer.main.get_command(probe).params if p.name == "config"]
    option.expose_value = False  # the callback stores it; commands never see it
    return option


def _late_wide(ctx: typer.Context, value: bool) -> None:
    if value:
        get_context(ctx).wide = True


def _wide_option() -> Any:
    """``--wide`` for every command that prints a table (those with ``--json``)."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(wide: Annotated[bool, typer.Option(
            "--wide", callback=_late_wide,
            help="every column, full UIDs (to copy), as wide as it takes")] = False) -> None:
        pass

    (option,) = [p for p in typer.main.get_command(probe).params if p.name == "wide"]
    option.expose_value = False
    return option


def _plain(text: str) -> str:
    """Help text as a terminal shows it: the docstrings' reST ``literal`` quotes
    would print as double backticks, which no operator types."""
    return text.replace("``", "")


def _flag_help_option(command: Any) -> None:
    """``--help`` is made by click per invocation, after the flags above were
    fixed, so it is fixed where it is made: a flag, not "--help <bool>"."""
    make = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def _tidy_help(command: Any) -> None:
    """One command's help as an operator reads it (the root's and every other's)."""
    for param in command.params:
        # Typer's help shows every flag as "--json <bool>", which reads as if it took
        # a value; a flag has no metavar.
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if isinstance(getattr(param, "help", None), str):
            param.help = _plain(param.help)
    if isinstance(getattr(command, "help", None), str):
        command.help = _plain(command.help)
    _flag_help_option(command)


def _add_config_option(command: Any) -> None:
    if not any(p.name == "config" for p in command.params):
        command.params.append(_config_option())
    if any(p.name == "as_json" for p in command.params) and \
            not any(p.name == "wide" for p in command.params):
        command.params.append(_wide_option())
    _tidy_help(command)
    for sub in getattr(command, "commands", {}).values():
        _add_config_option(sub)


class _RootGroup(TyperGroup):
    """The root command; it gives every command below it (any depth) a ``--config``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)
        for command in self.commands.values():
            _add_config_option(command)


app = typer.Typer(
    cls=_RootGroup,
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
app.command("calibrate")(calibrate_cmd.calibrate)
app.add_typer(feedback_cmd.app, name="feedback")
app.add_typer(dataset_cmd.app, name="dataset")
app.add_typer(qa_cmd.app, name="qa")
app.add_typer(users_cmd.app, name="users")
app.command("web")(web_cmd.web)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ainode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help=_CONFIG_HELP, envvar="AINODE_CONFIG",
                     exists=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also the libraries' INFO lines (alembic, "
                           "highdicom)")
    ] = False,
) -> None:
    source = ctx.get_parameter_source("config")
    explicit = getattr(source, "name", "") == "COMMANDLINE"  # not from AINODE_CONFIG
    ctx.obj = AppContext(config_path=config, config_explicit=explicit, verbose=verbose)


def exit_code(exc: NodeError) -> int:
    return 2 if isinstance(exc, ConfigError | InputError) else 1


def main() -> None:
    """Run the CLI; every failure the admin can meet ends in one line and an exit code.

    A database error that escaped a command's own handling (the server went
    away mid-command) is still one line naming what failed, password masked.
    """
    try:
        app()
    except NodeError as exc:
        typer.echo(f"ainode: error: {mask_text(str(exc))}", err=True)
        sys.exit(exit_code(exc))
    except SQLAlchemyError as exc:
        typer.echo(f"ainode: error: database: {mask_text(db_reason(exc))}", err=True)
        sys.exit(1)

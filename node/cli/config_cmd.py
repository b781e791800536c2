"""``ainode config``: check and show the configuration in force."""

from __future__ import annotations

import json
from typing import Annotated

import typer
import yaml

from node.cli.context import get
from node.secrets import mask_tree

app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)


@app.command("check")
def check(ctx: typer.Context) -> None:
    """Validate the config file and AINODE_* variables; exit 2 naming each bad key."""
    cfg = get(ctx).config
    typer.echo(f"configuration valid: AE {cfg.dicom.ae_title} on {cfg.dicom.host}:{cfg.dicom.port}")


@app.command("show")
def show(ctx: typer.Context, as_json: Annotated[bool, typer.Option(
        "--json", help="JSON instead of YAML")] = False) -> None:
    """Print the effective configuration (file + environment + defaults), secrets masked."""
    cfg = get(ctx).config
    # Secrets masked (database password, any *password*/*token* key): the output is
    # pasted into tickets and chats.
    data = mask_tree(json.loads(cfg.model_dump_json()))
    typer.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False))

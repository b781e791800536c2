"""``ainode config``: check and show the configuration in force."""

from __future__ import annotations

import json

import typer
import yaml
from sqlalchemy.engine import make_url

from node.cli.context import get

app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)


@app.command("check")
def check(ctx: typer.Context) -> None:
    """Validate the config file and AINODE_* variables; exit 2 naming each bad key."""
    cfg = get(ctx).config
    typer.echo(f"configuration valid: AE {cfg.dicom.ae_title} on {cfg.dicom.host}:{cfg.dicom.port}")


@app.command("show")
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective configuration (file + environment + defaults)."""
    cfg = get(ctx).config
    data = json.loads(cfg.model_dump_json())
    url = data["storage"].get("database_url")
    if url:  # a password written into the URL is shown masked, as secrets are
        data["storage"]["database_url"] = make_url(url).render_as_string(hide_password=True)
    typer.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False))

"""``ainode db``: schema migrations."""

from __future__ import annotations

import typer

from node.cli.context import get
from storage import migrate

app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@app.command("upgrade")
def upgrade(ctx: typer.Context, revision: str = typer.Argument("head")) -> None:
    """Create or migrate the schema to REVISION (default: the newest)."""
    db = get(ctx).raw_db
    rev = migrate.upgrade(db, revision)
    typer.echo(f"database {db.safe_url} at revision {rev}")


@app.command("current")
def current(ctx: typer.Context) -> None:
    """Print the schema revision in force, and whether it is the newest."""
    db = get(ctx).raw_db
    rev = migrate.current_revision(db)
    head = migrate.head_revision()
    state = "up to date" if rev == head else f"behind (newest is {head}); run: ainode db upgrade"
    typer.echo(f"{rev or '(empty database)'}: {state}")


@app.command("downgrade")
def downgrade(ctx: typer.Context, revision: str = typer.Argument(
        ..., help="the revision to go back to (see `ainode db current` of the older release)")
) -> None:
    """Roll the schema back to REVISION, for going back to an older ainode (backup first)."""
    db = get(ctx).raw_db
    rev = migrate.downgrade(db, revision)
    typer.echo(f"database {db.safe_url} at revision {rev or '(empty)'}")

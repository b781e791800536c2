"""``ainode users``: the web console's and API's local users, and their API tokens.

Passwords are asked for (twice) or generated, never taken from the command
line, where they would land in shell history and ``ps``; ``--generate``
prints a generated one once. Every change is audited with the OS user.
"""

from __future__ import annotations

from typing import Annotated

import typer

from node.cli.context import get
from node.cli.output import emit
from storage import users
from storage.audit import os_actor
from storage.errors import ConflictError, InputError
from storage.models import UserRole

__all__ = ["app"]

app = typer.Typer(help="Web console and API users: add, list, remove, reset, token.",
                  no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table")]
GenerateOpt = Annotated[bool, typer.Option(
    "--generate", help="generate a password and print it once (instead of asking)")]


def _password(generate: bool) -> str:
    if generate:
        return users.generate_password()
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@app.command("add")
def add(ctx: typer.Context, username: str,
        role: Annotated[UserRole, typer.Option("--role", help="viewer or admin")]
        = UserRole.VIEWER,
        generate: GenerateOpt = False) -> None:
    """Add a user (viewer by default)."""
    from storage import migrate

    app_ctx = get(ctx)
    migrate.upgrade(app_ctx.db)
    password = _password(generate)
    try:
        with app_ctx.db.session() as s:
            users.add_user(s, username, password, role, actor=os_actor())
    except ConflictError as exc:  # a taken name is refused input (exit 2), as elsewhere
        raise InputError(str(exc)) from exc
    typer.echo(f"user {username} added ({role.value})")
    if generate:
        typer.echo(f"password: {password}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The users and their roles (never their passwords)."""
    with get(ctx).db.session() as s:
        rows = [{"username": u.username, "role": u.role.value, "created_at": u.created_at,
                 "password_changed_at": u.password_changed_at} for u in users.list_users(s)]
    emit(rows, ("username", "role", "created_at", "password_changed_at"), as_json=as_json,
         title="users")


@app.command("remove")
def remove(ctx: typer.Context, username: str) -> None:
    """Remove a user, their sessions and their API tokens."""
    with get(ctx).db.session() as s:
        users.remove_user(s, username, actor=os_actor())
    typer.echo(f"user {username} removed")


@app.command("reset")
def reset(ctx: typer.Context, username: str, generate: GenerateOpt = False) -> None:
    """Set a new password; the user's browser sessions end."""
    password = _password(generate)
    with get(ctx).db.session() as s:
        users.reset_password(s, username, password, actor=os_actor())
    typer.echo(f"password of {username} reset")
    if generate:
        typer.echo(f"password: {password}")


@app.command("token")
def token(ctx: typer.Context, username: str,
          name: Annotated[str, typer.Option("--name", help="what the token is for")] = "api"
          ) -> None:
    """Create an API token acting as USERNAME (with their role); printed once."""
    with get(ctx).db.session() as s:
        secret = users.create_token(s, username, name, actor=os_actor())
    typer.echo(secret)

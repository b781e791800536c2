"""The demo's last step: a first admin and the console URL, and the console itself when asked.

Why the password is generated (and reset on a rerun): the demo runs on the
embedded default with no set-up, so there is no one to ask; it is printed
once, on the terminal of whoever ran the demo, and the reset is audited.
"""

from __future__ import annotations

from collections.abc import Callable

from node.config import NodeConfig
from storage import migrate, users
from storage.audit import os_actor
from storage.db import Database
from storage.models import User, UserRole

__all__ = ["DEMO_ADMIN", "offer_console"]

DEMO_ADMIN = "admin"


def offer_console(config: NodeConfig, say: Callable[[str], None], *, serve: bool,
                  series_uid: str | None = None) -> str:
    """Make or reset the demo admin, print how to log in; serve until Ctrl-C if ``serve``."""
    from sqlalchemy import select

    db = Database(config.storage.effective_database_url)
    try:
        migrate.upgrade(db)
        password = users.generate_password()
        with db.session() as s:
            exists = s.scalars(select(User).where(User.username == DEMO_ADMIN)).one_or_none()
            if exists is None:
                users.add_user(s, DEMO_ADMIN, password, UserRole.ADMIN, actor=os_actor())
            else:
                users.reset_password(s, DEMO_ADMIN, password, actor=os_actor())
    finally:
        db.dispose()
    web = config.web
    url = f"{'https' if web.cert_file else 'http'}://{web.host}:{web.port}/"
    say("")
    say(f"Web console: {url}  (user {DEMO_ADMIN}, password {password})")
    if series_uid:
        say(f"  the demo series: {url}series/{series_uid}")
    if not serve:
        say("  serve it with: ainode web")
        return url
    from node.web import WebContext, WebServer

    ctx = WebContext.from_config(config)
    say("  serving it now; Ctrl-C stops it")
    try:
        WebServer(ctx).run()
    finally:
        ctx.close()
    return url

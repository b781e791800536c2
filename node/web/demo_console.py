"""The demo's last step: a first admin and the console URL, and the console itself when asked.

Why the password is generated (and reset on a rerun): the demo runs on the
embedded default with no set-up, so there is no one to ask; it is printed
once, on the terminal of whoever ran the demo, and the reset is audited.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig
from storage import migrate, users
from storage.audit import os_actor
from storage.db import Database
from storage.models import User, UserRole

__all__ = ["DEMO_ADMIN", "console_config", "offer_console"]

DEMO_ADMIN = "admin"


def console_config(config: NodeConfig, node_dir: Path | None) -> NodeConfig:
    """The node's config pointed at the demo's own data directory.

    Why: the demo keeps its series, rule and destination in a data directory of
    its own (``node.demo.demo_config``); a console on the node's database would
    not know the demo series the printed link names, and the demo admin would
    land in a database the demo never used.
    """
    if node_dir is None:
        return config
    storage = config.storage.model_copy(update={
        "data_dir": node_dir, "database_url": None, "spool_dir": None, "results_dir": None})
    return config.model_copy(update={"storage": storage})


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
        say(f"  serve it with: AINODE_STORAGE__DATA_DIR={config.storage.data_dir} ainode web")
        return url
    from node.web import WebContext, WebServer

    ctx = WebContext.from_config(config)
    say("  serving it now; Ctrl-C stops it")
    try:
        WebServer(ctx).run()
    finally:
        ctx.close()
    return url

"""Shared state of one CLI invocation: the config, loaded once, and what hangs off it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from node import logs
from node.config import NodeConfig, load_config
from node.secrets import secrets_of
from storage import migrate
from storage.db import Database
from storage.filestore import FileStore

__all__ = ["AppContext", "get"]


@dataclass
class AppContext:
    config_path: Path | None = None
    # Given on the command line (not from AINODE_CONFIG): a second, different
    # --config after the command name is then refused (node.cli).
    config_explicit: bool = False
    # --verbose: library INFO lines (alembic, highdicom) too.
    verbose: bool = False
    # --wide: tables with every column and full UIDs (node.cli.output).
    wide: bool = False
    _config: NodeConfig | None = field(default=None, repr=False)
    _db: Database | None = field(default=None, repr=False)
    _schema_checked: bool = field(default=False, repr=False)

    @property
    def config(self) -> NodeConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
            lc = self._config.logging
            logs.configure(lc.level, lc.format, lc.file, verbose=self.verbose,
                           secrets=secrets_of(self._config))
        return self._config

    @property
    def raw_db(self) -> Database:
        """The database as it is, schema or not (``ainode db`` itself)."""
        if self._db is None:
            self._db = Database(self.config.storage.effective_database_url)
        return self._db

    @property
    def db(self) -> Database:
        """The database with its schema: created on a fresh one, so no command meets
        ``no such table``; an older revision is refused with the command that fixes it."""
        db = self.raw_db
        if not self._schema_checked:
            created = migrate.ensure_schema(db)
            if created:
                typer.echo(f"ainode: created the database schema at revision {created} "
                           f"({db.safe_url})", err=True)
            self._schema_checked = True
        return db

    def filestore(self) -> FileStore:
        s = self.config.storage
        return FileStore(
            s.data_dir,
            spool_dir=s.spool_dir,
            results_dir=s.results_dir,
            min_free_mb=s.min_free_mb,
        )


def get(ctx: typer.Context) -> AppContext:
    """The AppContext of the root command (sub-apps share it)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, AppContext):
        obj = AppContext()
        ctx.find_root().obj = obj
    return obj

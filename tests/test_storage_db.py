"""Schema: migrations on SQLite and PostgreSQL, and that they match the models."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from storage import migrate
from storage.audit import audit
from storage.db import Database, normalise_url
from storage.models import AuditEvent, Base, Instance, Job, JobState, Series, Study

ROOT = Path(__file__).resolve().parents[1]

TABLES = {
    "studies", "series", "instances", "jobs", "findings", "outputs", "transfers",
    "destinations", "routing_rules", "audit_events",
}


def test_migrations_match_models(any_db: Database) -> None:
    with any_db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    assert migrate.current_revision(any_db) == migrate.head_revision()
    assert set(sa.inspect(any_db.engine).get_table_names()) >= TABLES


def test_upgrade_is_idempotent(any_db: Database) -> None:
    assert migrate.upgrade(any_db) == migrate.head_revision()


def test_sqlite_runs_wal_with_foreign_keys(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_constraints_and_timestamps(any_db: Database) -> None:
    with any_db.session() as s:
        study = Study(study_instance_uid="1.2.3")
        series = Series(series_instance_uid="1.2.3.4", study=study, modality="CT")
        s.add(series)
        s.flush()
        s.add(Instance(sop_instance_uid="1.2.3.4.5", series=series, sop_class_uid="1.2",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", path="a/b/c.dcm",
                       size_bytes=10, sha256="0" * 64))
        s.add(Job(series=series, pipeline="pancreas-ct", model_version="1"))
        audit(s, "instance.received", actor="PACS", series_uid="1.2.3.4", size=10)
    with any_db.session() as s:
        series = s.scalars(sa.select(Series)).one()
        assert series.first_received_at.tzinfo is not None
        assert series.first_received_at <= datetime.now(UTC)
        assert s.scalars(sa.select(Job)).one().state is JobState.QUEUED
        assert s.scalars(sa.select(AuditEvent)).one().details == {"size": 10}
    # Same SOP instance twice is refused by the database itself.
    with pytest.raises(IntegrityError), any_db.session() as s:
        series = s.scalars(sa.select(Series)).one()
        s.add(Instance(sop_instance_uid="1.2.3.4.5", series=series, sop_class_uid="1.2",
                       transfer_syntax_uid="1.2", path="x", size_bytes=1, sha256="0" * 64))
    # A second job for the same series, rule, model and generation is refused.
    with pytest.raises(IntegrityError), any_db.session() as s:
        series = s.scalars(sa.select(Series)).one()
        s.add(Job(series=series, pipeline="pancreas-ct", model_version="1"))
    # Foreign keys hold (SQLite needs the pragma for this).
    with pytest.raises(IntegrityError), any_db.session() as s:
        s.add(Job(series_id=999_999, pipeline="pancreas-ct"))


def test_postgres_url_uses_psycopg3() -> None:
    assert normalise_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://u:p@h/db")
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_cli_db_upgrade(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    env["AINODE_STORAGE__DATA_DIR"] = str(tmp_path / "data")
    if backend == "postgresql":
        env["AINODE_STORAGE__DATABASE_URL"] = request.getfixturevalue("postgres_url")
    run = [sys.executable, "-m", "node"]
    up = subprocess.run([*run, "db", "upgrade"], env=env, capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert f"at revision {migrate.head_revision()}" in up.stdout
    cur = subprocess.run([*run, "db", "current"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert "up to date" in cur.stdout
    if backend == "sqlite":
        assert (tmp_path / "data" / "ainode.db").is_file()

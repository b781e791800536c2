"""Issue 21, at the command line: no traceback, no silent mistake, no secret, tables that fit.

Each case runs the real ``ainode`` in a subprocess, as an admin would, and
checks the whole of what it prints: one line and an exit code, never a
traceback.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from node.config import NodeConfig
from node.send import RetryPolicy, send_due
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, utcnow
from tests.support.net import free_port
from tests.support.peers import store_scp
from tests.test_render import rendered_series  # noqa: F401  (fixture)
from tests.test_send import add_destination, queue, store_outputs

CLI = str(Path(sys.executable).with_name("ainode"))
DEAD_PG = "postgresql://ainode:s3cret@127.0.0.1:1/ainode"


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
        columns: int = 100) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AINODE_")}
    full.update({"AINODE_STORAGE__MIN_FREE_MB": "0", "COLUMNS": str(columns),
                 "AINODE_DICOM__PORT": str(free_port())}, **(env or {}))
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=full, cwd=cwd)


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_fresh_data_dir_commands_create_the_schema(tmp_path: Path) -> None:
    listed = run(tmp_path, "rules", "list")
    assert listed.returncode == 0, listed.stderr
    assert one_line(listed.stderr).startswith("ainode: created the database schema at revision")
    added = run(tmp_path, "rules", "add", "ct", "--when", "Modality=CT", "--pipeline",
                "pancreas-ct", "--no-send", "--json")
    assert added.returncode == 0, added.stderr
    assert "warning" not in added.stderr and "created the database" not in added.stderr
    assert '"name": "ct"' in added.stdout
    # db current on its own database says what it is, with no alembic INFO lines.
    cur = run(tmp_path, "db", "current")
    assert cur.returncode == 0 and cur.stderr == "" and "up to date" in cur.stdout
    verbose = run(tmp_path, "--verbose", "db", "current")
    assert "alembic" in verbose.stderr


@pytest.mark.parametrize("args", [("db", "current"), ("rules", "list"), ("status",)])
def test_unreachable_postgresql_is_one_line_exit_1(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = run(tmp_path, *args, env={"AINODE_STORAGE__DATABASE_URL": DEAD_PG})
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "ainode:***@127.0.0.1:1/ainode" in line and "Connection refused" in line
    assert "s3cret" not in proc.stderr + proc.stdout


def test_serve_retries_an_unreachable_database_then_gives_up(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = run(tmp_path, "serve", env={"AINODE_STORAGE__DATABASE_URL": DEAD_PG,
                                       "AINODE_STORAGE__DATABASE_WAIT_S": "3"}, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ainode: error")]
    assert len(errors) == 1 and "gave up after 3 s" in errors[0]
    assert "retrying" in proc.stderr and "Traceback" not in proc.stderr
    # the wait is said as a person reads it, not as 1.9969885499995144
    waits = re.findall(r"retry_in_s=([0-9.]+)", proc.stderr)
    assert waits and all(len(w.partition(".")[2]) <= 1 for w in waits), waits
    assert "s3cret" not in proc.stderr
    assert took >= 3


def test_config_show_masks_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(f"storage:\n  database_url: {DEAD_PG}\n")
    for fmt in ((), ("--json",)):
        proc = run(tmp_path, "--config", str(cfg), "config", "show", *fmt)
        assert proc.returncode == 0, proc.stderr
        assert "s3cret" not in proc.stdout and "ainode:***@127.0.0.1:1/ainode" in proc.stdout


def test_rule_without_condition_needs_catch_all_and_without_destination_warns(
        tmp_path: Path) -> None:
    refused = run(tmp_path, "rules", "add", "all", "--pipeline", "pancreas-ct")
    assert refused.returncode == 2
    assert "would route every series" in refused.stderr and "--catch-all" in refused.stderr
    assert "rule created" not in refused.stderr  # refused before anything is saved
    assert run(tmp_path, "rules", "list", "--json").stdout.strip() == "[]"
    warned = run(tmp_path, "rules", "add", "all", "--pipeline", "pancreas-ct", "--catch-all")
    assert warned.returncode == 0
    assert "sends its results nowhere" in warned.stderr and "--no-send" in warned.stderr
    bad = run(tmp_path, "rules", "add", "x", "--when", "Modality==CT", "--pipeline",
              "pancreas-ct", "--no-send")
    assert bad.returncode == 2 and "write Modality=CT" in one_line(bad.stderr)


def test_help_shows_json_and_wide_as_flags(tmp_path: Path) -> None:
    proc = run(tmp_path, "jobs", "list", "--help", columns=120)
    lines = [ln for ln in proc.stdout.splitlines() if "--json" in ln or "--wide" in ln]
    assert len(lines) == 2 and not any("<bool>" in ln for ln in lines)


@pytest.mark.parametrize("command", [(), ("rules", "add"), ("jobs",)])
def test_help_has_no_bool_metavar_and_no_rest_quotes(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    proc = run(tmp_path, *command, "--help", columns=120)
    assert proc.returncode == 0, proc.stderr
    assert "--help" in proc.stdout
    assert "<bool>" not in proc.stdout and "``" not in proc.stdout


def test_tables_fit_and_wide_shows_full_uids(
        tmp_path: Path, data_dir: Path,
        rendered_series: tuple[list[pydicom.Dataset], object]) -> None:  # noqa: F811
    sources, _ = rendered_series
    uid = str(sources[0].SeriesInstanceUID)
    env = {"AINODE_STORAGE__DATA_DIR": str(data_dir)}
    narrow = run(data_dir, "series", "list", env=env, columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(ln) for ln in narrow.stdout.splitlines()) <= 80
    assert uid not in narrow.stdout and "--wide shows them in full" in narrow.stdout
    wide = run(data_dir, "series", "list", "--wide", env=env, columns=80)
    assert uid in wide.stdout
    as_json = run(data_dir, "series", "list", "--json", env=env, columns=80)
    assert f'"series_uid": "{uid}"' in as_json.stdout


def test_render_of_undecodable_pixels_is_one_line(
        tmp_path: Path, data_dir: Path, sqlite_db: Database, filestore: FileStore,
        rendered_series: tuple[list[pydicom.Dataset], object]) -> None:  # noqa: F811
    sources, _ = rendered_series
    with sqlite_db.session() as s:
        path = filestore.spool_path(s.scalars(select(Instance.path)).first())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00" * 64])  # framed as JPEG 2000, but no code stream
    ds.save_as(path, enforce_file_format=True)
    proc = run(data_dir, "render", str(sources[0].SeriesInstanceUID), "--all", "--out",
               str(tmp_path / "png"), env={"AINODE_STORAGE__DATA_DIR": str(data_dir)})
    assert proc.returncode == 2
    assert "cannot decode the pixels" in one_line(proc.stderr)


@pytest.mark.peers
def test_send_logs_each_outcome_with_its_reason_and_jobs_list_shows_it(
        tmp_path: Path, data_dir: Path, sqlite_db: Database, filestore: FileStore,
        caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.data import dicom_series_dir
    from tests.test_dicom_out_writers import load_sorted

    sources = load_sorted(dicom_series_dir("ct_phantom_philips"))
    outputs = store_outputs(sqlite_db, filestore, sources)[:2]
    port = free_port()
    add_destination(sqlite_db, "pacs", port, ae="STORESCP")
    queue(sqlite_db, outputs, ["pacs"])
    policy = RetryPolicy(base_s=1, ceiling_s=2, max_attempts=5)
    env = {"AINODE_STORAGE__DATA_DIR": str(data_dir)}
    caplog.set_level(logging.INFO, logger="node.send")
    now = utcnow()
    send_due(sqlite_db, filestore, NodeConfig(), now=now, policy=policy)  # nobody listens
    failed = [r for r in caplog.records if r.name == "node.send"]
    assert len(failed) == 2 and all(r.levelno == logging.WARNING for r in failed)
    # The reason, not "status=None": what failed and where.
    assert all(r.getMessage().startswith("transfer not sent, will retry: pacs: connection "
                                         "refused") and f"127.0.0.1:{port}" in r.getMessage()
               for r in failed), [r.getMessage() for r in failed]
    listed = run(data_dir, "jobs", "list", env=env)
    assert "pending 2/2" in listed.stdout
    caplog.clear()
    with store_scp(tmp_path / "pacs", "STORESCP") as live:
        from storage import destinations

        with sqlite_db.session() as s:
            destinations.by_name(s, "pacs").port = live  # type: ignore[union-attr]
        send_due(sqlite_db, filestore, NodeConfig(), now=now + timedelta(seconds=5),
                 policy=policy)
    sent = [r.getMessage() for r in caplog.records if r.name == "node.send"]
    assert sent == ["transfer sent on retry (attempt 2)"] * 2
    assert "sent" in run(data_dir, "jobs", "list", env=env).stdout

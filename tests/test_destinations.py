"""``ainode destinations``: add / list / remove / echo, config sync, refused input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import DestinationConfig
from storage import destinations
from storage.db import Database
from storage.errors import ConflictError, InputError
from storage.models import AuditEvent
from tests.support.net import free_port
from tests.support.peers import orthanc
from tests.test_render import ainode


def listed(data_dir: Path, *extra: str) -> dict[str, dict[str, object]]:
    proc = ainode(data_dir, *extra, "destinations", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_add_list_remove(sqlite_db: Database, data_dir: Path) -> None:
    proc = ainode(data_dir, "destinations", "add", "pacs", "--ae-title", "PACS", "--host",
                  "127.0.0.1", "--port", "104", "--accepts", "seg,SR")
    assert proc.returncode == 0, proc.stderr
    row = listed(data_dir)["pacs"]
    assert (row["ae_title"], row["port"], row["accepts"], row["source"]) == \
        ("PACS", 104, "SEG,SR", "cli")
    assert ainode(data_dir, "destinations", "remove", "pacs").returncode == 0
    assert "pacs" not in listed(data_dir)
    with sqlite_db.session() as s:
        evs = [e.event for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert evs == ["destination.added", "destination.removed"]


@pytest.mark.parametrize(("args", "message"), [
    (["--ae-title", "A" * 17, "--host", "h", "--port", "104"], "ae_title"),
    (["--ae-title", "PACS", "--host", "h", "--port", "0"], "port"),
    (["--ae-title", "PACS", "--host", "h", "--port", "104", "--accepts", "SEG,PDF"], "accepts"),
])
def test_refused_input_exits_2(sqlite_db: Database, data_dir: Path, args: list[str],
                               message: str) -> None:
    proc = ainode(data_dir, "destinations", "add", "bad", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_duplicate_and_unknown_names_exit_2(sqlite_db: Database, data_dir: Path) -> None:
    args = ["destinations", "add", "pacs", "--ae-title", "PACS", "--host", "h", "--port", "104"]
    assert ainode(data_dir, *args).returncode == 0
    dup = ainode(data_dir, *args)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert ainode(data_dir, "destinations", "remove", "nope").returncode == 2
    assert ainode(data_dir, "destinations", "echo", "nope").returncode == 2


def test_config_destinations_are_synced_and_protected(sqlite_db: Database, data_dir: Path
                                                      ) -> None:
    cfg = data_dir / "node.yaml"
    cfg.write_text("destinations:\n  - {name: main, ae_title: MAINPACS, host: 127.0.0.1, "
                   "port: 4242, accepts: [SR, SC]}\n")
    row = listed(data_dir, "--config", str(cfg))["main"]
    assert (row["source"], row["accepts"], row["enabled"]) == ("config", "SR,SC", True)
    proc = ainode(data_dir, "--config", str(cfg), "destinations", "remove", "main")
    assert proc.returncode == 2 and "config file" in proc.stderr
    # Gone from the config: disabled, not deleted (its transfer history stays).
    assert listed(data_dir)["main"]["enabled"] is False


def test_store_add_conflict_and_remove_config(sqlite_db: Database) -> None:
    cfg = DestinationConfig(name="x", ae_title="X", host="h", port=1)
    with sqlite_db.session() as s:
        destinations.add(s, cfg)
    with sqlite_db.session() as s, pytest.raises(ConflictError):
        destinations.add(s, cfg)
    with sqlite_db.session() as s:
        destinations.sync_from_config(s, [DestinationConfig(name="y", ae_title="Y", host="h",
                                                            port=2)])
    with sqlite_db.session() as s, pytest.raises(InputError, match="config file"):
        destinations.remove(s, "y")


@pytest.mark.peers
def test_echo(sqlite_db: Database, data_dir: Path, tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        add = ["destinations", "add", "pacs", "--ae-title", "ORTHANC", "--host", "127.0.0.1",
               "--port", str(pacs.dicom_port)]
        assert ainode(data_dir, *add).returncode == 0
        ok = ainode(data_dir, "destinations", "echo", "pacs")
        assert ok.returncode == 0, ok.stderr
        assert "C-ECHO succeeded" in ok.stdout
    down = ["destinations", "add", "down", "--ae-title", "X", "--host", "127.0.0.1",
            "--port", str(free_port())]
    assert ainode(data_dir, *down).returncode == 0
    bad = ainode(data_dir, "destinations", "echo", "down")
    assert bad.returncode == 1 and "down" in bad.stderr
    with sqlite_db.session() as s:
        outcomes = [(e.details["destination"], e.outcome) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.event == "destination.echo")
            .order_by(AuditEvent.id))]
    assert outcomes == [("pacs", "success"), ("down", "failure")]

"""The demo's console step serves the demo's own database, where its series is."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from node.config import NodeConfig, StorageConfig
from node.web.demo_console import DEMO_ADMIN, console_config, offer_console
from storage.db import Database
from storage.models import User


def _users(db_file: Path) -> list[str]:
    db = Database(f"sqlite:///{db_file}")
    try:
        with db.session() as s:
            return list(s.scalars(select(User.username)))
    finally:
        db.dispose()


def test_the_demo_admin_goes_into_the_demo_database_not_the_nodes(tmp_path: Path) -> None:
    node_data = tmp_path / "node-data"
    demo_dir = tmp_path / "demo" / "node"
    demo_dir.mkdir(parents=True)
    config = NodeConfig(storage=StorageConfig(data_dir=node_data))
    lines: list[str] = []
    url = offer_console(console_config(config, demo_dir), lines.append, serve=False,
                        series_uid="1.2.3")
    assert _users(demo_dir / "ainode.db") == [DEMO_ADMIN]
    assert not (node_data / "ainode.db").exists()
    text = "\n".join(lines)
    assert f"{url}series/1.2.3" in text
    assert f"AINODE_STORAGE__DATA_DIR={demo_dir} ainode web" in text


def test_without_a_demo_directory_the_config_is_the_nodes(tmp_path: Path) -> None:
    config = NodeConfig(storage=StorageConfig(data_dir=tmp_path))
    assert console_config(config, None) is config

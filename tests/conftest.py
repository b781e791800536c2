"""Fixtures shared by every test tier, and the markers that say what each test needs.

``make test-fast`` selects ``not peers and not postgres and not slow``;
tests/support/markers.py says how each marker is derived.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pydicom
import pytest

from storage import migrate
from storage.db import Database
from storage.filestore import FileStore
from tests.support import markers
from tests.support.services import POSTGRES_ADMIN_URL, ensure_postgres, fresh_postgres_database

# What the node writes is validated strictly; what it reads is real scanner data
# that is not always valid, so reading stays tolerant (the node's own policy).
pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markers.apply_markers(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item,
                            nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """The running test, for the run-time marker checks of tests/support (markers.needs)."""
    markers.set_running(item)
    try:
        return (yield)
    finally:
        markers.set_running(None)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def filestore(data_dir: Path) -> FileStore:
    return FileStore(data_dir)


@pytest.fixture
def sqlite_db(data_dir: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{data_dir / 'ainode.db'}")
    migrate.upgrade(db)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Database]:
    if not ensure_postgres():
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and could not be started")
    db = Database(POSTGRES_ADMIN_URL)
    yield db
    db.dispose()


@pytest.fixture
def postgres_url(postgres_admin: Database) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    markers.needs("postgres", "PostgreSQL")
    with fresh_postgres_database(postgres_admin) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Database]:
    """The migrated schema on each supported back end in turn."""
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'ainode.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    db = Database(url)
    migrate.upgrade(db)
    yield db
    db.dispose()

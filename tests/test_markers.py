"""The markers that select the fast tier are derived from what each test uses; check the rules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import markers
from tests.support.node import start_node
from tests.support.peers import require

REPO = Path(__file__).resolve().parents[1]


def _calls_a_peer_through_a_helper() -> None:
    _helper()


def _helper() -> str:
    return require("echoscu")


def _starts_a_node(tmp: Path) -> Any:
    return start_node(tmp)


def _pure(x: int) -> int:
    return x + 1


def test_peer_use_is_found_directly_through_helpers_and_in_closures() -> None:
    assert markers._uses_peer(_helper, set())
    assert markers._uses_peer(_calls_a_peer_through_a_helper, set())
    assert markers._uses_peer(_starts_a_node, set())
    assert markers._uses_peer(lambda: (lambda: require("storescu"))(), set())
    assert not markers._uses_peer(_pure, set())


def test_postgres_is_wanted_by_fixture_or_parametrisation() -> None:
    def item(fixtures: list[str], params: dict[str, Any] | None = None) -> Any:
        callspec = None if params is None else SimpleNamespace(params=params)
        return SimpleNamespace(fixturenames=fixtures, callspec=callspec)

    assert markers._wants_postgres(item(["any_db"], {"any_db": "postgresql"}))
    assert not markers._wants_postgres(item(["any_db"], {"any_db": "sqlite"}))
    assert markers._wants_postgres(item(["postgres_url"]))
    assert not markers._wants_postgres(item(["sqlite_db", "tmp_path"]))


def test_this_run_marked_the_postgresql_parametrisation(any_db: Any,
                                                         request: pytest.FixtureRequest) -> None:
    marked = request.node.get_closest_marker("postgres") is not None
    assert marked == any_db.url.startswith("postgresql")


def test_an_unmarked_use_of_a_peer_fails_with_the_fix() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"add @pytest.mark.peers"):
        markers.needs("peers", "echoscu")


@pytest.mark.peers
def test_a_marked_use_passes() -> None:
    markers.needs("peers", "echoscu")


def test_every_slow_entry_names_an_existing_test() -> None:
    for key in markers.SLOW:
        path, name = key.split("::", 1)
        func = name.split("[", 1)[0]
        source = (REPO / path).read_text()
        assert f"def {func}(" in source, f"{key}: no such test (renamed? update SLOW)"

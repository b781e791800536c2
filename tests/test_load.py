"""One small round of the load harness (tests/support/load.py): 8 concurrent storescu
senders while a pancreas job runs; ``make soak`` runs 8 x 300 slices for a chosen time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.load import landed, load_round, start_job, start_load_node

pytestmark = [pytest.mark.peers, pytest.mark.slow]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_eight_senders_while_a_job_runs_all_land(tmp_path: Path, backend: str,
                                                 request: pytest.FixtureRequest) -> None:
    """On both databases: concurrent receivers' commits are where the back ends differ."""
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    node = start_load_node(tmp_path, database_url=url)
    try:
        start_job(node, tmp_path)
        report = load_round(node, tmp_path, senders=8, slices=12)
        folders = sorted(tmp_path.glob("load-*"))
        print(f"load: {report.summary()}")
        assert report.failed_senders == 0
        assert report.sent == report.acknowledged == 96
        assert landed(node, folders) == 96  # every acknowledged instance recorded
        assert len(report.latencies_ms) == 96 and report.rss_mb
    finally:
        node.stop()

"""The short seeded run of the fuzz harness (tests/support/fuzz.py) against a live node;
``make fuzz`` runs the same for a chosen time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzz import fuzz, start_fuzz_node

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def test_hostile_pdus_and_datasets_break_no_promise(tmp_path: Path) -> None:
    node = start_fuzz_node(tmp_path)
    try:
        report = fuzz(node, max_examples=30, seed=19, probe_every=20)
    finally:
        node.stop()
    print(f"fuzz: {report.cases} cases {report.by_kind}; outcomes {report.outcomes}; "
          f"RSS MB {min(report.rss_mb):.0f}..{max(report.rss_mb):.0f}; "
          f"defects {report.defects}")
    assert report.cases == 60
    assert len(report.by_kind) >= 12  # most of the 17 kinds drawn at this size
    assert report.defects == []
    assert max(report.rss_mb) < min(report.rss_mb) + 300  # bounded (a 1 GiB bomb included)

"""A destination down for an hour of the scheduler's clock: attempts counted over the window
(backoff, jitter, a cap: no retry storm), each in the audit log, delivery once it is back.

The clock is the ``now`` the scheduler would pass (every 10 s here); the network is
real: nothing listens on the destination's port while it is down, and dcmtk's
storescp is the destination when it returns.
"""

from __future__ import annotations

import random
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from node.config import NodeConfig, SendConfig
from node.send import RetryPolicy, send_due
from storage.db import Database
from storage.filestore import FileStore
from storage.models import TransferState, utcnow
from tests.support.net import free_port, wait_for
from tests.support.peers import dcmtk_env, require
from tests.test_dicom_out_writers import load_sorted
from tests.test_send import add_destination, events, queue, store_outputs, transfers


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_sorted("ct_phantom_philips")


def test_an_hour_down_then_back_counted_attempts_and_delivery(
    sqlite_db: Database, filestore: FileStore, sources: list[pydicom.Dataset],
    tmp_path: Path,
) -> None:
    outputs = store_outputs(sqlite_db, filestore, sources)
    n = len(outputs)
    port = free_port()
    add_destination(sqlite_db, "pacs", port, ae="DEST")
    queue(sqlite_db, outputs, ["pacs"])
    cfg = NodeConfig(send=SendConfig(retry_base_s=30, retry_ceiling_s=600,
                                     retry_max_attempts=50, retry_jitter=0.2))
    policy = RetryPolicy.from_config(cfg.send)
    object.__setattr__(policy, "rng", random.Random(19))  # seeded: the same run each time
    t0 = utcnow()
    ticks = 360  # one hour, a scheduler turn every 10 s
    for i in range(ticks):
        send_due(sqlite_db, filestore, cfg, now=t0 + timedelta(seconds=10 * i), policy=policy)
    rows = transfers(sqlite_db)
    attempts = [t.attempts for t in rows]
    # Without jitter: 30, 60, 120, 240, 480, then every 600 s: 9 attempts in 3600 s.
    # Jitter only shortens waits (at most 20 %): at most 11.
    print(f"attempts per transfer over 1 h down: {sorted(attempts)}")
    assert all(8 <= a <= 11 for a in attempts), attempts
    assert all(t.state == TransferState.PENDING for t in rows)
    spread = {t.next_attempt_at for t in rows}
    assert len(spread) == n  # jitter: the transfers do not come back in the same second
    retries = events(sqlite_db, "transfer.retry")
    assert len(retries) == sum(attempts)  # every attempt audited
    assert all("connection refused" in e.details["error"] for e in retries)
    # The destination returns (dcmtk storescp); the next due attempt delivers.
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    scp = subprocess.Popen([require("storescp"), "-aet", "DEST", "-od", str(out_dir),
                            str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        later = t0 + timedelta(seconds=10 * ticks + 600)
        report = send_due(sqlite_db, filestore, cfg, now=later, policy=policy)
        assert report.sent == n
        wait_for(lambda: len(list(out_dir.iterdir())) == n, timeout=30,
                 what="the objects at storescp")
    finally:
        scp.terminate()
        scp.wait(timeout=30)
    assert all(t.state == TransferState.SENT for t in transfers(sqlite_db))
    sent = events(sqlite_db, "transfer.sent")
    assert sorted(e.details["attempt"] for e in sent) == sorted(a + 1 for a in attempts)


def test_policy_from_config_and_jitter_bounds() -> None:
    p = RetryPolicy.from_config(SendConfig(retry_base_s=10, retry_ceiling_s=100,
                                           retry_max_attempts=3, retry_jitter=0.5))
    assert (p.base_s, p.ceiling_s, p.max_attempts) == (10, 100, 3)
    waits = [p.delay(a).total_seconds() for a in range(1, 8) for _ in range(50)]
    assert max(waits) <= 100 and min(waits) >= 5
    assert RetryPolicy().delay(3).total_seconds() == 120  # no jitter unless asked

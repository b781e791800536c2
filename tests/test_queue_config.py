"""Celery dispatch rules that need no broker: start-up refusals, priorities, queues.

What the workers refuse before they connect anywhere, and the mappings the
publisher uses; the behaviour against the real engines is
tests/test_celery_dispatch.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import NodeConfig
from node.queue import message_priority
from node.queue.app import broker_kind, celery_app, check_broker_limits
from node.queue.publish import device_class
from node.queue.worker import check_shared_database, run_celery_worker
from storage import migrate
from storage.db import Database
from storage.errors import ConfigError
from storage.filestore import FileStore
from storage.models import WorkerState


def test_a_broker_limit_below_the_job_time_limit_stops_the_worker(tmp_path: Path) -> None:
    config = NodeConfig(storage={"data_dir": tmp_path},
                        queue={"broker_url": "amqp://guest:guest@127.0.0.1:5672//",
                               "consumer_timeout_s": 1800},
                        inference={"job_timeout_s": 3600})
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ConfigError, match="consumer_timeout") as err:
        run_celery_worker(config, db, FileStore(tmp_path), queues=["cpu"], device="cpu",
                          concurrency=1)
    assert "3720000" in str(err.value)  # the rabbitmq.conf value that would do, in ms
    ok = config.model_copy(update={"inference": config.inference.model_copy(
        update={"job_timeout_s": 1600})})
    check_broker_limits(ok)
    redis = NodeConfig(storage={"data_dir": tmp_path}, inference={"job_timeout_s": 7200},
                       queue={"broker_url": "redis://127.0.0.1:6379/0"})
    check_broker_limits(redis)  # Redis' limit is ours to set, and is set above the job's
    opts = celery_app(redis).conf.broker_transport_options
    assert opts["visibility_timeout"] > 7200


def test_a_worker_on_sqlite_from_another_host_is_refused(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    migrate.upgrade(db)
    remote = NodeConfig(storage={"data_dir": tmp_path},
                        queue={"broker_url": "amqp://guest:guest@rabbit.example:5672//"})
    with pytest.raises(ConfigError, match=r"cannot use SQLite.*PostgreSQL"):
        check_shared_database(db, remote)
    local = NodeConfig(storage={"data_dir": tmp_path},
                       queue={"broker_url": "amqp://guest:guest@127.0.0.1:5672//"})
    check_shared_database(db, local)  # beside the node, on its broker: allowed
    with db.session() as s:  # the node that owns the file runs elsewhere
        s.add(WorkerState(name="other:1:x", kind="node", host="other-host", pid=1,
                          device="-", queues=[]))
    with pytest.raises(ConfigError, match="belongs to the node on other-host"):
        check_shared_database(db, local)




def test_priorities_and_device_classes() -> None:
    assert [message_priority(p, "amqp") for p in (-1000, -1, 0, 1, 5, 1000)] == [0, 3, 4, 5, 9, 9]
    assert [message_priority(p, "redis") for p in (0, 5)] == [5, 0]  # Redis runs 0 first
    assert broker_kind("amqp://h//") == "amqp" and broker_kind("rediss://h/0") == "redis"
    with pytest.raises(ConfigError, match="unsupported broker scheme"):
        broker_kind("sqs://x")

    class Gpu:
        device_class = "gpu"

    assert device_class(Gpu()) == "gpu" and device_class(object()) == "cpu"


def test_celery_settings_for_long_tasks(tmp_path: Path) -> None:
    conf = celery_app(NodeConfig(storage={"data_dir": tmp_path}, queue={
        "broker_url": "amqp://127.0.0.1//", "pipeline_queues": {"x": "x-queue"}})).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_send_task_events
    assert {q.name: q.queue_arguments["x-max-priority"] for q in conf.task_queues} == {
        "cpu": 10, "gpu": 10, "x-queue": 10}

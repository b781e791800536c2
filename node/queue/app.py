"""The Celery application of one node, configured for long GPU tasks.

Each setting answers a known pitfall of hour-long tasks:

* ``task_acks_late``: a message is acknowledged after the task returns, not when
  it is received, so a worker that dies mid-job leaves its message to the
  broker, which hands it to another worker.
* ``task_reject_on_worker_lost``: when a pool child dies (prefork pool: OOM,
  SIGKILL) its message is requeued, not acknowledged as failed; with the thread
  pool the whole process goes and the broker requeues on the lost connection.
* ``worker_prefetch_multiplier = 1``: a worker reserves one message per free
  slot, so a long job never holds a second message hostage while other workers
  are idle.
* broker timeouts above ``inference.job_timeout_s``: RabbitMQ closes a channel
  that keeps a message unacknowledged longer than its ``consumer_timeout``
  (default 30 min) and Redis re-delivers after ``visibility_timeout``; both
  would hand a running job's message to a second worker. The Redis one is
  ours to set (here); RabbitMQ's is the broker's, which it does not tell
  clients, so the config states it and workers refuse to start below it.
* ``worker_send_task_events`` / ``task_send_sent_event``: task events on, so
  Flower and ``celery events`` show the workers and their tasks.
* ``task_ignore_result``: the outcome is in the job row; no result backend.
* ``task_queue_max_priority = 10``: queues are declared with ``x-max-priority``
  so a rule's priority becomes the message priority (``message_priority``).

The lease on the job row is renewed by the worker while the job runs
(node.worker), whatever the broker does; that is what the sweep and the
requeue of expired leases rely on, not the message.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from node.config import NodeConfig
from storage.errors import ConfigError

__all__ = ["DEVICE_CLASSES", "MAX_PRIORITY", "TASK_NAME", "broker_kind", "celery_app",
           "check_broker_limits", "message_priority"]

TASK_NAME = "ainode.run_job"
DEVICE_CLASSES = ("cpu", "gpu")
MAX_PRIORITY = 10  # x-max-priority: message priorities 0..9
# Seconds a message may stay unacknowledged beyond the job's own time limit: the
# time to load and plan before the clock starts, and to save after it stops.
MARGIN_S = 120.0


def broker_kind(url: str) -> str:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    if scheme in ("redis", "rediss"):
        return "redis"
    raise ConfigError(f"queue.broker_url: unsupported broker scheme {scheme!r} "
                      "(amqp:// for RabbitMQ or redis://)")


def message_priority(rule_priority: int, kind: str) -> int:
    """A rule's priority (-1000..1000, 0 normal) as a message priority.

    0 becomes 4 on RabbitMQ (higher runs first), each step up or down moves
    one, saturating at 0 and 9, so an urgent rule (priority 5 or more) goes
    before a backlog of normal jobs. Redis' kombu transport runs 0 first, so
    the scale is turned round there.
    """
    amqp = max(0, min(MAX_PRIORITY - 1, 4 + int(rule_priority)))
    return amqp if kind == "amqp" else MAX_PRIORITY - 1 - amqp


def check_broker_limits(config: NodeConfig) -> None:
    """Refuse a broker whose message limit is shorter than a job may run (ConfigError)."""
    url = config.queue.broker_url
    if not url:
        raise ConfigError("queue.broker_url is not set: Celery dispatch needs a broker")
    need = config.inference.job_timeout_s + MARGIN_S
    if broker_kind(url) == "amqp" and config.queue.consumer_timeout_s < need:
        raise ConfigError(
            f"RabbitMQ's consumer_timeout ({config.queue.consumer_timeout_s:g} s, "
            "queue.consumer_timeout_s) is shorter than a job may run "
            f"(inference.job_timeout_s {config.inference.job_timeout_s:g} s + "
            f"{MARGIN_S:g} s): the broker would take a running job's message back and "
            "give it to another worker. Raise consumer_timeout in rabbitmq.conf (ms) "
            f"to at least {int(need * 1000)} and set queue.consumer_timeout_s to match, "
            "or lower inference.job_timeout_s")


def _queues(config: NodeConfig) -> list[Queue]:
    names = dict.fromkeys([*DEVICE_CLASSES, *config.queue.pipeline_queues.values()])
    return [Queue(n, routing_key=n, queue_arguments={"x-max-priority": MAX_PRIORITY})
            for n in names]


def celery_app(config: NodeConfig) -> Celery:
    """The node's Celery app for ``queue.broker_url`` (producer and worker alike)."""
    url = config.queue.broker_url
    if not url:
        raise ConfigError("queue.broker_url is not set: Celery dispatch needs a broker")
    kind = broker_kind(url)
    app = Celery("ainode", broker=url, set_as_current=False)
    transport: dict[str, Any] = {}
    if kind == "redis":
        transport = {"visibility_timeout": int(config.inference.job_timeout_s + MARGIN_S * 2),
                     "queue_order_strategy": "priority", "sep": ":",
                     "priority_steps": list(range(MAX_PRIORITY))}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=_queues(config),
        task_default_queue="cpu",
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=message_priority(0, kind),
        task_create_missing_queues=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart delays work, never ends a worker
        broker_heartbeat=30,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app

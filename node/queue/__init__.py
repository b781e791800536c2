"""Dispatch through Celery: a task per ready job, carrying only the job id.

Why Celery over a broker when the database already is a queue: workers on
other machines must learn that work is waiting without polling the database,
work must reach the right kind of machine (a GPU model never lands on a CPU
worker), and operations teams watch queues with tools they know (Flower,
RabbitMQ's own). What keeps a job exactly once stays where it was: the claim
with a lease on the job row (storage.jobs). A message is a hint; the row is
the truth. A duplicate or stale message finds the job not claimable and is
acknowledged without running anything.

* ``app``:     the Celery application and the choices for hour-long GPU tasks
* ``publish``: publishing ready jobs, and the sweep that re-publishes lost ones
* ``task``:    the task body: claim, run ``node.jobs.run_job`` under a lease, commit
* ``worker``:  ``ainode worker --celery``: start-up checks, the worker's own row
"""

from node.queue.app import DEVICE_CLASSES, celery_app, check_broker_limits, message_priority
from node.queue.publish import Publisher

__all__ = ["DEVICE_CLASSES", "Publisher", "celery_app", "check_broker_limits",
           "message_priority"]

"""Job execution, apart from whoever claims the job.

``run`` holds the job body as a plain function (``run_job``); ``node.worker``
is the thread/lease runner that claims jobs and calls it, and any other
runner (a task queue's worker) calls the same function after its own claim.
"""

from node.jobs.run import JobDeps, JobOutcome, JobPlan, record_failure, resolve_device, run_job

__all__ = ["JobDeps", "JobOutcome", "JobPlan", "record_failure", "resolve_device", "run_job"]

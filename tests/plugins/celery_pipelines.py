"""Pipelines for the Celery dispatch tests: instant, slow, and one that needs a GPU.

No model in any of them (the pancreas models would make the tests minutes
long); each reports the source slices it saw, so the SR the node writes and
sends is a real result object. ``SLOW_ENV`` (read in the worker process) is
how long the slow one sleeps in inference, long enough for a test to catch
a job mid-run and kill its worker.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.results import AlgorithmInfo, AnalysisResult

__all__ = ["BURN_ENV", "SLOW_ENV", "burn", "burn_cpu", "gpu", "slow", "tiny"]

SLOW_ENV = "AINODE_TEST_SLOW_S"
BURN_ENV = "AINODE_BENCH_BURN_ITERS"


def burn_cpu(iterations: int) -> float:
    """A fixed amount of single-threaded CPU work (the benchmark's stand-in for inference)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((160, 160))
    acc = 0.0
    for _ in range(iterations):
        acc += float(np.linalg.norm(a @ a.T))
    return acc


@dataclass
class _Pipeline:
    name: str
    device: str
    device_class: str = "cpu"
    sleep_s: float = 0.0
    min_slices: int = 1

    def model_version(self) -> str:
        return f"{self.name}-1"

    burn_iterations: int = 0

    def run(self, volume: object) -> AnalysisResult:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.burn_iterations:
            burn_cpu(self.burn_iterations)
        uids = list(getattr(volume, "sop_instance_uids", []))
        return AnalysisResult(pipeline=self.name, algorithm=AlgorithmInfo(
            f"ainode {self.name}", self.model_version()), source_sop_instance_uids=uids)


def tiny(*, models_dir: Path | None, device: str) -> _Pipeline:
    return _Pipeline("celery-tiny", device)


def slow(*, models_dir: Path | None, device: str) -> _Pipeline:
    return _Pipeline("celery-slow", device, sleep_s=float(os.environ.get(SLOW_ENV, "6")))


def gpu(*, models_dir: Path | None, device: str) -> _Pipeline:
    """Declares that it needs a GPU: its jobs go to the ``gpu`` queue only."""
    return _Pipeline("celery-gpu", device, device_class="gpu")


def burn(*, models_dir: Path | None, device: str) -> _Pipeline:
    """CPU-bound for ``BURN_ENV`` iterations of a small matrix product (bench_workers)."""
    return _Pipeline("celery-burn", device, burn_iterations=int(os.environ.get(BURN_ENV, "0")))

"""The "model": the brightest slice, and how sure it is (its margin over the runner-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ainode_keyimages.output import to_result
from ainode_keyimages.preprocess import slice_means
from pipelines.results import AnalysisResult
from pipelines.volume import Volume
from storage.errors import PipelineError

__all__ = ["BrightestSlice"]

VERSION = "1.0.0-test"


class BrightestSlice:
    """No weights: ``models_dir`` and ``device`` are kept only to show they arrive."""

    name = "brightest-slice"
    min_slices = 2  # a margin over the runner-up needs a runner-up

    def __init__(self, *, models_dir: Path | None, device: str) -> None:
        self.models_dir, self.device = models_dir, device

    def model_version(self) -> str:
        return VERSION

    def run(self, volume: object) -> AnalysisResult:
        if not isinstance(volume, Volume):
            raise PipelineError("input", f"cannot analyse a {type(volume).__name__}")
        means = slice_means(volume)
        order = np.argsort(-means, kind="stable")
        best = int(order[0])
        spread = float(means.max() - means.min()) or 1.0
        margin = float(means[best] - means[order[1]]) / spread
        uids = list(volume.sop_instance_uids)
        return to_result(self.name, VERSION, uids, best, float(means[best]), margin)

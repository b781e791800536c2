"""A tiny pipeline plug-in: no model, instant, and it remembers how it was built.

``factory`` is the well-formed entry point; the others are the mistakes a
plug-in author makes, each of which the registry must turn into a clear
ModelError naming the plug-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.results import AlgorithmInfo, AnalysisResult

__all__ = ["TinyPipeline", "factory", "failing_factory", "no_args_factory", "not_a_factory"]


@dataclass
class TinyPipeline:
    models_dir: Path | None
    device: str
    name: str = "tiny"
    min_slices: int = 1

    def model_version(self) -> str:
        return "tiny-1"

    def run(self, volume: object) -> AnalysisResult:
        uids = list(getattr(volume, "sop_instance_uids", []))
        return AnalysisResult(pipeline=self.name, algorithm=AlgorithmInfo(
            "ainode tiny", self.model_version()), source_sop_instance_uids=uids)


def factory(*, models_dir: Path | None, device: str) -> TinyPipeline:
    return TinyPipeline(models_dir, device)


def no_args_factory() -> TinyPipeline:
    """The old shape: a factory that would silently ignore the configured models."""
    return TinyPipeline(None, "auto")


def failing_factory(*, models_dir: Path | None, device: str) -> TinyPipeline:
    raise RuntimeError("the tiny weights are not there")


not_a_factory = "tiny"

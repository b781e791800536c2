"""The Grad-CAM costs seconds a job: the runner asks for evidence maps only when a
destination accepts an evidence kind, and plug-ins without the keyword still run."""
from __future__ import annotations

from pipelines.dicom_out.builtins import EVIDENCE_KINDS
from pipelines.registry import run_pipeline


class _Takes:
    def __init__(self) -> None:
        self.asked: list[bool] = []

    def run(self, volume: object, *, evidence: bool | None = None) -> object:
        self.asked.append(bool(evidence))
        return volume


class _Plain:
    def run(self, volume: object) -> object:
        return volume


def test_the_evidence_keyword_reaches_a_pipeline_that_takes_it() -> None:
    p = _Takes()
    assert run_pipeline(p, "v", evidence=False) == "v"  # type: ignore[arg-type]
    assert run_pipeline(p, "v", evidence=True) == "v"  # type: ignore[arg-type]
    assert p.asked == [False, True]


def test_a_plugin_without_the_keyword_runs_as_before() -> None:
    assert run_pipeline(_Plain(), "v", evidence=True) == "v"  # type: ignore[arg-type]


def test_the_evidence_kinds_are_registered_writers() -> None:
    from pipelines.dicom_out import registry as writers

    assert set(writers.kinds()) >= EVIDENCE_KINDS
    assert not EVIDENCE_KINDS & set(writers.default_kinds())

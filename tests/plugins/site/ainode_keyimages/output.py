"""The finding in the node's generic result contract: one scored finding, no segment."""

from __future__ import annotations

from pipelines.results import AlgorithmInfo, AnalysisResult, Code, ScoredFinding

__all__ = ["BRIGHTEST", "to_result"]

# A private concept (99 = a local coding scheme): what the probability is of.
BRIGHTEST = Code("99KEYIMG", "BRIGHT", "Brightest slice")


def to_result(pipeline: str, version: str, uids: list[str], best: int, mean: float,
              margin: float) -> AnalysisResult:
    text = f"Brightest slice: {best + 1} of {len(uids)} (mean {mean:.1f})"
    return AnalysisResult(
        pipeline=pipeline,
        algorithm=AlgorithmInfo(name=f"ainode {pipeline}", version=version),
        source_sop_instance_uids=uids,
        findings=[ScoredFinding(key="brightest", concept=BRIGHTEST, label="brightest slice",
                                probability=round(min(max(margin, 0.0), 1.0), 4), text=text,
                                details={"slice_index": best,
                                         "sop_instance_uid": uids[best] if uids else ""})],
        summary_text=text,
        provenance={"slice_index": best},
    )

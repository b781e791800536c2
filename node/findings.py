"""Finding rows and job provenance from a pipeline's result, for any pipeline.

Why one conversion: the database, ``ainode jobs show``, the demo and the PNG
legend read Finding rows, and they must say what the pipeline said, not what
the worker assumes a pipeline finds. Each scored finding becomes one row; its
size, volume and mean attenuation land in the columns of those names when
the finding carries them in mm, ml and HU. A result that could not be
assessed and scored nothing still leaves a row saying so, with the reason.
"""

from __future__ import annotations

from typing import Any

from pipelines.results import (
    HOUNSFIELD_UNIT,
    MEAN_ATTENUATION,
    AnalysisResult,
    ScoredFinding,
)
from storage.models import Finding

__all__ = ["finding_rows", "job_provenance"]

_LABEL, _LOCATION = 64, 32  # the columns' lengths


def job_provenance(result: AnalysisResult) -> dict[str, Any]:
    """The job row's provenance: the algorithm and the scalar values of the result's."""
    return {"algorithm": result.algorithm.name, "algorithm_version": result.algorithm.version,
            "result": {k: v for k, v in result.provenance.items()
                       if isinstance(v, str | int | float | bool | type(None))}}


def _mean_hu(f: ScoredFinding) -> float | None:
    m = f.measurement(MEAN_ATTENUATION)
    if m is None or (m.unit.scheme, m.unit.value) != (HOUNSFIELD_UNIT.scheme,
                                                      HOUNSFIELD_UNIT.value):
        return None
    return float(m.value)


def _row(job_id: int, result: AnalysisResult, f: ScoredFinding) -> Finding:
    details = dict(f.details)
    if f.kind == "patient":
        details["summary"] = result.summary()
        if not result.assessed:
            details.update(status=result.status, reason=result.reason)
    if f.legend:
        details.setdefault("legend", f.legend_text())
    # What the probability is, in the words the SR uses for it (its concept's meaning),
    # so `ainode jobs show` names the score as the report does.
    details.setdefault("score_name", f.concept.meaning)
    return Finding(
        job_id=job_id, kind=f.kind, label=f.label[:_LABEL], probability=float(f.probability),
        location=None if f.location is None else f.location[:_LOCATION],
        diameter_mm=None if f.size_mm is None else float(f.size_mm),
        volume_ml=None if f.volume_ml is None else float(f.volume_ml),
        mean_hu=_mean_hu(f), tracking_uid=f.tracking_uid or None, details=details,
    )


def finding_rows(job_id: int, result: AnalysisResult) -> list[Finding]:
    """One row per scored finding, in the result's order (series-level first by convention)."""
    rows = [_row(job_id, result, f) for f in result.findings]
    if not rows:
        rows.append(Finding(
            job_id=job_id, kind="patient",
            label="not assessable" if not result.assessed else "no finding",
            probability=None,
            details={"summary": result.summary(), "status": result.status,
                     "reason": result.reason},
        ))
    return rows

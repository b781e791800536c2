"""Finding rows come from the result's scored findings, for any pipeline (node.findings)."""

from __future__ import annotations

import numpy as np

from node.findings import finding_rows, job_provenance
from pipelines.pancreas.output import Lesion, PancreasReport
from pipelines.results import (
    HOUNSFIELD_UNIT,
    MEAN_ATTENUATION,
    MILLIMETER,
    PROBABILITY,
    AlgorithmInfo,
    AnalysisResult,
    Measurement,
    ScoredFinding,
)

ALG = AlgorithmInfo("ainode test", "1")


def test_rows_carry_what_the_pipeline_said() -> None:
    mhu = Measurement(MEAN_ATTENUATION, 31.5, HOUNSFIELD_UNIT)
    result = AnalysisResult(
        pipeline="any", algorithm=ALG, source_sop_instance_uids=[],
        findings=[
            ScoredFinding("study", "nodule probability", PROBABILITY, 0.4,
                          details={"model": "x"}),
            ScoredFinding("n1", "nodule", PROBABILITY, 0.9, kind="nodule", location="RUL",
                          size_mm=7.0, volume_ml=0.2, measurements=(mhu,), legend="N1 7 mm",
                          tracking_uid="2.25.1"),
            # a mean attenuation in other units is not mistaken for HU
            ScoredFinding("n2", "nodule", PROBABILITY, 0.2, kind="nodule",
                          measurements=(Measurement(MEAN_ATTENUATION, 3.0, MILLIMETER),)),
        ],
        summary_text="one nodule", provenance={"timings": {"a": 1}, "device": "cpu"},
    )
    study, n1, n2 = finding_rows(7, result)
    assert (study.kind, study.label, study.probability) == ("patient", "nodule probability", 0.4)
    assert study.details == {"model": "x", "summary": "one nodule", "score_name": "Probability"}
    assert (n1.kind, n1.location, n1.diameter_mm, n1.volume_ml, n1.mean_hu, n1.tracking_uid) == \
        ("nodule", "RUL", 7.0, 0.2, 31.5, "2.25.1")
    assert n1.details == {"legend": "N1 7 mm", "score_name": "Probability"} and n1.job_id == 7
    assert n2.mean_hu is None and n2.tracking_uid is None
    assert job_provenance(result) == {"algorithm": "ainode test", "algorithm_version": "1",
                                      "result": {"device": "cpu"}}


def test_a_result_that_scored_nothing_still_leaves_a_row() -> None:
    result = AnalysisResult(pipeline="any", algorithm=ALG, source_sop_instance_uids=[],
                            status="not_assessable", reason="wrong body part")
    (row,) = finding_rows(1, result)
    assert (row.kind, row.label, row.probability) == ("patient", "not assessable", None)
    assert row.details == {"summary": "Not assessable: wrong body part",
                           "status": "not_assessable", "reason": "wrong body part"}


def test_pancreas_rows_are_those_the_worker_wrote_before() -> None:
    mask = np.zeros((2, 4, 4), bool)
    mask[0, 1, 1] = True
    report = PancreasReport(
        "pancreas-ct", ALG, ["1", "2"], 0.93, True, mask, None,
        [Lesion(1, mask, 0.92, 23.0, 1.2, (1.0, 2.0, 3.0), "head", -20.5,
                type_probabilities={"PDAC": 0.7})],
        {"PDAC": 0.8},
    )
    patient, lesion = finding_rows(3, report.to_result())
    assert (patient.kind, patient.label, patient.probability) == \
        ("patient", "Patient-level PDAC probability", 0.93)
    assert patient.details["pancreas_found"] is True
    assert patient.details["classification"] == {"PDAC": 0.8}
    assert patient.details["summary"] == report.summary()
    assert (lesion.kind, lesion.label, lesion.probability, lesion.location) == \
        ("lesion", "lesion", 0.92, "head")
    assert (lesion.diameter_mm, lesion.volume_ml, lesion.mean_hu) == (23.0, 1.2, -20.5)
    assert lesion.details["index"] == 1
    assert lesion.details["centroid_lps_mm"] == [1.0, 2.0, 3.0]
    assert lesion.details["type_probabilities"] == {"PDAC": 0.7}
    not_found = PancreasReport("pancreas-ct", ALG, [], 0.0, False).to_result()
    (row,) = finding_rows(4, not_found)
    assert row.probability == 0.0 and row.details["pancreas_found"] is False
    assert row.details["reason"] == "pancreas not found"
    assert row.details["summary"].startswith("Pancreas not found")

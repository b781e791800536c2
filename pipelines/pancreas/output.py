"""What the pancreas pipeline found, in its own terms, and how it says it in the generic result.

Why here: the PDAC probability, "pancreas found", the tumour-type
classification, the part of the gland and the mean HU mean something only to
this pipeline. :class:`PancreasReport` holds them; :meth:`PancreasReport.
to_result` turns them into the shared contract (segments, scored findings,
codes, the sentences the SR, the GSPS and the Secondary Capture show), so the
writers, the worker and the database never see a pancreas field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipelines.pancreas.quality import output_descriptors
from pipelines.results import (
    HOUNSFIELD_UNIT,
    MEAN_ATTENUATION,
    NO_UNITS,
    AlgorithmInfo,
    AnalysisResult,
    Code,
    EvidenceMap,
    Measurement,
    QualityRecord,
    ScoredFinding,
    Segment,
    probability_text,
)

__all__ = [
    "CALIBRATED",
    "LESION_CONFIDENCE",
    "LESION_CONFIDENCE_CALIBRATED",
    "LESION_CONFIDENCE_NAME",
    "PANCREAS",
    "PATIENT_KEY",
    "PATIENT_PROBABILITY_NAME",
    "PDAC_PROBABILITY",
    "PDAC_PROBABILITY_CALIBRATED",
    "TUMOUR_TYPES",
    "TUMOUR_TYPE_CONCEPTS",
    "Lesion",
    "PancreasLocation",
    "PancreasReport",
    "lesion_text",
    "location_concept",
    "probability_label",
]

PancreasLocation = Literal["head", "neck", "body", "tail"]
# Class order of every tumour-type output (slice classifier and stage-2 head).
TUMOUR_TYPES: tuple[str, ...] = ("normal", "PDAC", "PNET", "IPMN", "other_benign")
PATIENT_KEY = "patient-level"  # the series-level finding: the SR tracking identifier

# Segmented property category / type (CID 7150 / 7151), as in pydicom's dictionary.
ANATOMICAL_STRUCTURE = Code("SCT", "91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL = Code("SCT", "49755003", "Morphologically Abnormal Structure")
PANCREAS = Code("SCT", "15776009", "Pancreas")
NEOPLASM = Code("SCT", "108369006", "Neoplasm")
# The two scores a reader sees, each named once, here: every sentence, label, legend
# and SR concept below takes its words from probability_label(). A package with a
# calibration (``ainode calibrate``) reports calibrated values, and every name then
# says so: one value per concept, never the raw one beside it.
PATIENT_PROBABILITY_NAME = "Patient-level PDAC probability"
LESION_CONFIDENCE_NAME = "Lesion confidence"
CALIBRATED = "Calibrated"


def probability_label(kind: Literal["patient", "lesion"], calibrated: bool = False) -> str:
    """The name of the score of a patient-level or a lesion finding, as readers see it."""
    name = PATIENT_PROBABILITY_NAME if kind == "patient" else LESION_CONFIDENCE_NAME
    return f"{CALIBRATED} {name[0].lower()}{name[1:]}" if calibrated else name


# Private codes (scheme 99AINODE): DCM 111047 "Probability of cancer" and 122157
# "Probability" read in a viewer as two more probabilities of one thing; these say
# which score it is. The calibrated ones are other concepts (another number of the
# same case), so they have codes of their own.
PDAC_PROBABILITY = Code("99AINODE", "PT-PDAC", probability_label("patient"))
LESION_CONFIDENCE = Code("99AINODE", "LES-CONF", probability_label("lesion"))
PDAC_PROBABILITY_CALIBRATED = Code("99AINODE", "PT-PDAC-CAL", probability_label("patient", True))
LESION_CONFIDENCE_CALIBRATED = Code("99AINODE", "LES-CONF-CAL",
                                    probability_label("lesion", True))

# Parts of the pancreas (SNOMED CT body structures). SNOMED has a "neck of
# pancreas" concept but its identifier is not in pydicom's dictionary and we
# would rather say "pancreas" than print an unverified code: the text label
# still names the neck.
_LOCATIONS: dict[str, Code] = {
    "head": Code("SCT", "64163001", "Head of pancreas"),
    "body": Code("SCT", "40133006", "Body of pancreas"),
    "tail": Code("SCT", "73239005", "Tail of pancreas"),
    "neck": PANCREAS,
}

# Probabilities of each tumour type, in TUMOUR_TYPES order. Private to the
# node (coding scheme "99AINODE"): no standard code says "probability of PNET".
# Named as the classifier's class shares, not as "probability of PDAC": the
# patient-level PDAC probability is another number (it also weighs the lesion map).
TUMOUR_TYPE_CONCEPTS: dict[str, Code] = {
    "normal": Code("99AINODE", "TT-NORMAL", "Tumour-type classifier share: no tumour"),
    "PDAC": Code("99AINODE", "TT-PDAC", "Tumour-type classifier share: PDAC"),
    "PNET": Code("99AINODE", "TT-PNET", "Tumour-type classifier share: PNET"),
    "IPMN": Code("99AINODE", "TT-IPMN", "Tumour-type classifier share: IPMN"),
    "other_benign": Code("99AINODE", "TT-OTHER", "Tumour-type classifier share: other benign"),
}


# What the two evidence maps show (private: no standard code names "Grad-CAM").
LESION_MAP = Code("99AINODE", "EV-LESPROB", "Lesion probability map")
ATTRIBUTION = Code("99AINODE", "EV-GRADCAM", "Grad-CAM attribution, tumour-type head")


def location_concept(location: PancreasLocation | None) -> Code:
    """The finding site for a lesion location; the whole pancreas when unknown."""
    if location is None:
        return PANCREAS
    return _LOCATIONS[location]


@dataclass(frozen=True, slots=True)
class Lesion:
    """One lesion candidate, numbered from 1 in order of decreasing confidence."""

    index: int
    mask: npt.NDArray[np.bool_]  # (slices, rows, cols) on the source grid
    confidence: float  # peak lesion probability, 0..1
    diameter_mm: float  # long-axis diameter
    volume_ml: float
    centroid_lps_mm: tuple[float, float, float]
    location: PancreasLocation | None = None  # None when no pancreas was found
    mean_hu: float | None = None  # None for MR
    label: str = "lesion"
    tracking_uid: str = ""  # minted before the writers run if empty
    type_probabilities: dict[str, float] | None = None
    # From the candidate's nearest voxel to the predicted gland (0: it overlaps it); only
    # candidates within the pipeline's lesion margin are reported at all.
    distance_to_pancreas_mm: float | None = None
    # The confidence before the package's calibration (None: ``confidence`` is raw).
    raw_confidence: float | None = None

    @property
    def key(self) -> str:
        return f"lesion-{self.index}"


def lesion_text(les: Lesion, calibrated: bool = False) -> str:
    where = f"pancreatic {les.location}" if les.location else "the pancreas region"
    return (f"Suspicious lesion {les.index} in {where}, {les.diameter_mm:.0f} mm, "
            f"{probability_label('lesion', calibrated).lower()} "
            f"{probability_text(les.confidence)}")


def _conf(calibrated: bool) -> str:
    """The short word for a lesion's confidence in a segment label or a legend."""
    return "calibrated conf" if calibrated else "conf"


def _types(probabilities: dict[str, float] | None) -> tuple[Measurement, ...]:
    return tuple(Measurement(TUMOUR_TYPE_CONCEPTS[k], float(v), NO_UNITS)
                 for k, v in (probabilities or {}).items() if k in TUMOUR_TYPE_CONCEPTS)


@dataclass(slots=True)
class PancreasReport:
    """The pancreas pipeline's output in its own terms (what evaluation scores)."""

    pipeline: str
    algorithm: AlgorithmInfo
    source_sop_instance_uids: list[str]
    patient_score: float  # combined PDAC probability, 0..1
    pancreas_found: bool
    pancreas_mask: npt.NDArray[np.bool_] | None = None
    lesion_probability: npt.NDArray[np.float32] | None = None  # for FRACTIONAL SEG
    lesions: list[Lesion] = field(default_factory=list)
    classification: dict[str, float] | None = None  # over TUMOUR_TYPES
    source_frame_numbers: list[int] | None = None  # multi-frame sources only
    provenance: dict[str, Any] = field(default_factory=dict)
    # Why the applicability step refused the series (it names the check), None when it
    # passed. A refused report carries no lesion, and its result no segment.
    not_assessable: str | None = None
    # The package's calibration in words when the scores above are calibrated (then the
    # raw patient score is kept beside them for the record); None: they are raw.
    calibration: str | None = None
    raw_patient_score: float | None = None
    # What drove the findings (pipelines.explain): Grad-CAM of the tumour-type head on
    # the source grid, 0..1, and how it was computed. None: not computed.
    attribution: npt.NDArray[np.float32] | None = None
    attribution_method: str = ""
    # For drift monitoring (pipelines.pancreas.quality): the input's descriptors and
    # stage 2's pooled features (None: stage 2 did not run or exposes none).
    quality_descriptors: dict[str, float] = field(default_factory=dict)
    features: npt.NDArray[np.float64] | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the patient score is calibrated (each lesion says so of itself)."""
        return self.raw_patient_score is not None

    @property
    def assessable(self) -> bool:
        return self.pancreas_found and self.not_assessable is None

    def summary(self) -> str:
        """One line per finding, the way the SR text and the CLI say it."""
        if self.not_assessable is not None:
            return f"Not assessable: {self.not_assessable}"
        cal = self.calibrated
        patient = (f"{probability_label('patient', cal)} "
                   f"{probability_text(self.patient_score)}")
        if not self.pancreas_found:
            return "Pancreas not found; no assessment possible"
        if not self.lesions:
            return f"No suspicious pancreatic lesion found; {patient[0].lower()}{patient[1:]}"
        return f"{patient}. " + "; ".join(lesion_text(les, les.raw_confidence is not None)
                                          for les in self.lesions)

    def quality(self) -> QualityRecord:
        """The record drift monitoring keeps: input descriptors, raw outputs, features."""
        raw = [float(les.raw_confidence if les.raw_confidence is not None else les.confidence)
               for les in self.lesions]
        outputs = output_descriptors(self.patient_score, self.raw_patient_score, raw,
                                     self.provenance, self.assessable)
        feats = None if self.features is None else tuple(
            round(float(v), 5) for v in np.asarray(self.features).ravel())
        return QualityRecord(dict(self.quality_descriptors), outputs, feats)

    def to_result(self) -> AnalysisResult:
        """The generic result: the gland and each lesion as segments, the scores as findings.

        Refused by the applicability step: ``not_assessable`` with its reason and
        nothing else (no segment, no finding; the SR then says "not assessable"
        and why, with no lesion group), because a "Pancreas" segment or a PDAC
        probability on a series the models cannot judge would be invented.
        """
        if self.not_assessable is not None:
            return AnalysisResult(
                pipeline=self.pipeline, algorithm=self.algorithm,
                source_sop_instance_uids=list(self.source_sop_instance_uids),
                status="not_assessable", reason=self.not_assessable,
                summary_text=self.summary(), source_frame_numbers=self.source_frame_numbers,
                provenance=self.provenance, quality=self.quality(),
            )
        segments: list[Segment] = []
        if self.pancreas_mask is not None:
            segments.append(Segment("pancreas", "Pancreas", ANATOMICAL_STRUCTURE, PANCREAS,
                                    self.pancreas_mask))
        cal = self.calibrated
        calib = {} if not cal else {"calibrated": True, "calibration": self.calibration}
        patient = ScoredFinding(
            key=PATIENT_KEY, label=probability_label("patient", cal),
            concept=PDAC_PROBABILITY_CALIBRATED if cal else PDAC_PROBABILITY,
            probability=float(self.patient_score), kind="patient", site=PANCREAS,
            measurements=_types(self.classification),
            legend=f"{probability_label('patient', cal)} "
                   f"{probability_text(self.patient_score)}",
            details={"pancreas_found": self.pancreas_found,
                     "classification": self.classification or {}, **calib,
                     **({} if not cal else {"raw_probability": self.raw_patient_score})},
        )
        findings = [patient]
        for les in self.lesions:
            cal = les.raw_confidence is not None
            calib = {} if not cal else {"calibrated": True, "calibration": self.calibration}
            where = f" ({les.location})" if les.location else ""
            segments.append(Segment(
                les.key,
                f"Lesion {les.index}{where} {_conf(cal)} {probability_text(les.confidence)}",
                MORPHOLOGICALLY_ABNORMAL, NEOPLASM, les.mask,
                probability=self.lesion_probability,
                anatomic_region=location_concept(les.location),
                tracking_uid=les.tracking_uid,
            ))
            hu = () if les.mean_hu is None else (
                Measurement(MEAN_ATTENUATION, float(les.mean_hu), HOUNSFIELD_UNIT),)
            findings.append(ScoredFinding(
                key=les.key, label=les.label,
                concept=LESION_CONFIDENCE_CALIBRATED if cal else LESION_CONFIDENCE,
                probability=float(les.confidence), kind="lesion", segment=les.key,
                finding_type=NEOPLASM, site=location_concept(les.location),
                location=les.location, size_mm=float(les.diameter_mm),
                volume_ml=float(les.volume_ml),
                measurements=(*hu, *_types(les.type_probabilities)),
                text=lesion_text(les, cal),
                caption=f"{les.index}",
                legend=f"{les.index}: {les.location or 'pancreas region'}, "
                       f"{les.diameter_mm:.0f} mm, {_conf(cal)} "
                       f"{probability_text(les.confidence)}",
                tracking_uid=les.tracking_uid,
                details={"index": les.index, "centroid_lps_mm": list(les.centroid_lps_mm),
                         "type_probabilities": les.type_probabilities or {},
                         "distance_to_pancreas_mm": les.distance_to_pancreas_mm, **calib,
                         **({} if not cal else {"raw_probability": les.raw_confidence})},
            ))
        return AnalysisResult(
            pipeline=self.pipeline, algorithm=self.algorithm,
            source_sop_instance_uids=list(self.source_sop_instance_uids),
            segments=segments, findings=findings, evidence=self._evidence(),
            status="assessed" if self.pancreas_found else "not_assessable",
            reason=None if self.pancreas_found else "pancreas not found",
            summary_text=self.summary(), source_frame_numbers=self.source_frame_numbers,
            provenance=self.provenance, quality=self.quality(),
        )

    def _evidence(self) -> list[EvidenceMap]:
        """The lesion map and the head's attribution, for every finding of an assessed case.

        Both explain the patient-level score (it weighs the map's maximum and the
        head's PDAC share) and each lesion (cut from the map, typed by the head).
        """
        if not self.pancreas_found:
            return []
        out = []
        if self.lesion_probability is not None:
            out.append(EvidenceMap(
                "lesion-probability", "Lesion probability", LESION_MAP,
                self.lesion_probability,
                method="stage-2 lesion map (sigmoid), Gaussian-blended sliding windows, "
                       "resampled linearly onto the source grid"))
        if self.attribution is not None:
            out.append(EvidenceMap("gradcam", "Grad-CAM (tumour-type head)", ATTRIBUTION,
                                   self.attribution, method=self.attribution_method))
        return out

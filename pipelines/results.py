"""What a pipeline hands to the DICOM writers and to the database: the result contract.

Why generic: the writers, the worker and the database serve every pipeline,
so nothing here knows about one organ or one disease. A pipeline says what it
found in three lists, each item carrying its own codes and words:

* ``segments``: regions on the source grid (a SEG segment each), with the
  coded property they show and, optionally, a probability map;
* ``findings``: scored findings (a Finding row and a TID 1500 group each): a
  concept code saying what the probability is a probability *of*, a label,
  the probability, and optionally where it is, how large (long axis and
  volume), which segment it was measured on, further measurements and
  free details;
* ``summary_text``: the one-line impression the SR and the job row carry;
* ``evidence``: optional maps of what drove the findings (a probability map,
  a gradient attribution), 0..1 on the source grid, each naming the findings
  it explains: the Parametric Map and the evidence Secondary Capture;
* ``quality``: optional numbers about the input and the model's own state
  (intensity statistics of the organ, outputs, a pooled feature vector) that
  the node keeps per job and compares over time with the model package's
  reference (drift monitoring); never shown as a finding.

A finding that refers to a segment marks that segment as a *finding region*
(outlined in red on the GSPS and the Secondary Capture); a segment no finding
refers to is *context* (anatomy, drawn green for orientation). A result is
``assessed`` or ``not_assessable`` (with the reason): a series the pipeline
could not judge still gets a report that says so.

Every mask here lies on the *source* grid: axis 0 is the source slice order
given by ``source_sop_instance_uids`` (and ``source_frame_numbers`` for
multi-frame sources), axes 1 and 2 are the source rows and columns. The
pipelines produce it through the inverse of their preprocessing, so a writer
never resamples and a SEG frame always refers to the slice it was drawn on.

Codes are plain (scheme, value, meaning) triples so that this module stays
light (no highdicom): the writers turn them into coded concepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "HOUNSFIELD_UNIT",
    "LONG_AXIS",
    "MEAN_ATTENUATION",
    "MILLILITER",
    "MILLIMETER",
    "NO_UNITS",
    "PROBABILITY",
    "PROBABILITY_DECIMALS",
    "RESEARCH_DISCLAIMER",
    "VOLUME",
    "AlgorithmInfo",
    "AnalysisResult",
    "Code",
    "EvidenceMap",
    "Measurement",
    "QualityRecord",
    "ResultStatus",
    "ScoredFinding",
    "Segment",
    "people_probability",
    "probability_text",
]

ResultStatus = Literal["assessed", "not_assessable"]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: coding scheme designator, code value, code meaning (PS3.3 8.8)."""

    scheme: str  # e.g. "SCT", "DCM", "UCUM", or a private "99..." scheme
    value: str
    meaning: str

    def __post_init__(self) -> None:
        # Written as SH / LO / LO: an empty or over-long value would fail only at
        # the write stage, after inference.
        if not self.scheme or not self.value or not self.meaning:
            raise ValueError(f"a code needs scheme, value and meaning: {self!r}")
        if len(self.meaning) > 64:
            raise ValueError(f"code meaning longer than 64 characters: {self.meaning!r}")


# Concepts the shared path itself interprets (the Finding columns, the SR
# writer); the values are those of pydicom's code dictionary.
LONG_AXIS = Code("SCT", "103339001", "Long axis")
VOLUME = Code("SCT", "118565006", "Volume")
MEAN_ATTENUATION = Code("DCM", "112181", "Mean Attenuation Coefficient")
PROBABILITY = Code("DCM", "122157", "Probability")
MILLIMETER = Code("UCUM", "mm", "mm")
MILLILITER = Code("UCUM", "ml", "milliliter")
HOUNSFIELD_UNIT = Code("UCUM", "[hnsf'U]", "Hounsfield unit")
NO_UNITS = Code("UCUM", "1", "no units")

# A probability as people read it: two decimals, in the SR, the legends, the Finding
# table of `ainode jobs show` and the demo alike (the database and --json keep all).
PROBABILITY_DECIMALS = 2

# What every object the node writes says in a field a viewer shows.
RESEARCH_DISCLAIMER = "Research use only; not for diagnosis"


def people_probability(value: float | None) -> float | None:
    """``0.5934985801577568`` -> ``0.59``: the one rounding every reader-facing value gets."""
    return None if value is None else round(float(value), PROBABILITY_DECIMALS)


def probability_text(value: float | None) -> str:
    """``0.59``, or ``n/a``."""
    return "n/a" if value is None else f"{float(value):.{PROBABILITY_DECIMALS}f}"


@dataclass(frozen=True, slots=True)
class AlgorithmInfo:
    """Identifies the algorithm on every segment and measurement written."""

    name: str  # e.g. "ainode pancreas-ct"
    version: str  # model version, e.g. "0.1.0-demo"
    family: str = "artificial intelligence"
    manufacturer: str = "dicom-ai-node"
    intended_use: str = "research use only; not for clinical use"

    def __post_init__(self) -> None:
        # Written as DICOM LO (AlgorithmName, AlgorithmVersion, Manufacturer): a
        # longer value would fail only at the write stage, after inference.
        for key in ("name", "version", "manufacturer"):
            value = getattr(self, key)
            if not value or len(value) > 64:
                raise ValueError(f"AlgorithmInfo.{key} must be 1-64 characters: {value!r}")


@dataclass(frozen=True, slots=True)
class Segment:
    """One region on the source grid: a SEG segment, an outline on GSPS and SC."""

    key: str  # unique in the result; the SEG tracking ID, and what findings refer to
    label: str  # SEG segment label (LO, cut to 64)
    category: Code  # segmented property category (CID 7150)
    type: Code  # segmented property type (CID 7151)
    mask: npt.NDArray[np.bool_]  # (slices, rows, cols) on the source grid
    probability: npt.NDArray[np.float32] | None = None  # FRACTIONAL SEG values inside mask
    anatomic_region: Code | None = None
    tracking_uid: str = ""  # minted before the writers run when empty


@dataclass(frozen=True, slots=True)
class Measurement:
    """A numeric measurement of a finding, as a TID 300 item: concept, value, unit."""

    concept: Code
    value: float
    unit: Code = NO_UNITS


@dataclass(frozen=True, slots=True)
class ScoredFinding:
    """What the pipeline judged, with how likely it is: one Finding row, one TID 1500 group.

    ``kind`` is the Finding row's kind: ``patient`` for a series-level score,
    otherwise the kind of region (``lesion``, ``nodule``...). ``segment``
    names the Segment it was measured on; the SR then refers to it in the SEG.
    """

    key: str  # unique in the result; the SR tracking identifier
    label: str  # short name, the Finding row's label (64 characters)
    concept: Code  # what ``probability`` is the probability of
    probability: float  # 0..1
    kind: str = "patient"
    segment: str | None = None
    finding_type: Code | None = None  # TID 1501 finding type
    site: Code | None = None  # finding site
    location: str | None = None  # the site in words, for the Finding row
    size_mm: float | None = None  # long-axis diameter
    volume_ml: float | None = None
    measurements: tuple[Measurement, ...] = ()  # further TID 300 measurements
    text: str = ""  # the sentence the SR says about it
    caption: str = ""  # short text beside its outline (GSPS); default "<label> p=0.00"
    legend: str = ""  # its line in the burned-in legend (SC); default the caption
    tracking_uid: str = ""  # shared with its segment; minted before the writers run
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON values only

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:  # NaN fails this too
            raise ValueError(f"finding {self.key!r}: probability {self.probability} not in 0..1")

    def measurement(self, concept: Code) -> Measurement | None:
        """The first measurement of ``concept`` (compared by scheme and value)."""
        for m in self.measurements:
            if (m.concept.scheme, m.concept.value) == (concept.scheme, concept.value):
                return m
        return None

    def caption_text(self) -> str:
        return self.caption or f"{self.label} p={self.probability:.2f}"

    def legend_text(self) -> str:
        return self.legend or self.caption_text()


@dataclass(frozen=True, slots=True)
class EvidenceMap:
    """What drove one or more findings, voxel by voxel, on the source grid (values 0..1).

    ``quantity`` says what the values are (a probability, an attribution); a
    map explains the findings whose keys ``findings`` names (all of them when
    empty). ``method`` says how it was computed, in words a reader of the
    object's header can check (e.g. the layers a Grad-CAM used).
    """

    key: str  # unique in the result, e.g. "lesion-probability", "gradcam"
    label: str  # short name a viewer shows (LO, 64)
    quantity: Code
    values: npt.NDArray[np.float32]  # (slices, rows, cols) on the source grid, 0..1
    findings: tuple[str, ...] = ()
    method: str = ""

    def __post_init__(self) -> None:
        if self.values.ndim != 3:
            raise ValueError(f"evidence map {self.key!r} must be 3-D, not {self.values.shape}")
        if len(self.label) > 64:
            raise ValueError(f"evidence map label longer than 64 characters: {self.label!r}")


@dataclass(frozen=True, slots=True)
class QualityRecord:
    """What one run says about its input and about the model's state, for drift monitoring.

    Why separate from provenance: these are the numbers compared, job after job,
    with the distribution the model package's validation set gave
    (``pipelines.evaluation.drift``), so they must be named and computed the same
    way in ``ainode evaluate`` and in the node. ``descriptors`` describe the
    input (e.g. HU statistics inside the organ, voxel spacing); ``outputs`` the
    model's answers (patient score, candidate count, top confidence, raw, before
    calibration, because calibration is refitted and the model is what drifts);
    ``features`` a compact summary of the encoder's features (the pooled vector
    the competence check reads), None when the network exposes none.
    """

    descriptors: Mapping[str, float] = field(default_factory=dict)
    outputs: Mapping[str, float] = field(default_factory=dict)
    features: tuple[float, ...] | None = None

    def as_record(self, series: str) -> dict[str, Any]:
        """The form the drift statistics compare (``pipelines.evaluation.drift.compare``)."""
        return {"series": series, "descriptors": {**self.descriptors, **self.outputs},
                "features": list(self.features) if self.features is not None else None}


@dataclass(slots=True)
class AnalysisResult:
    """The output of one pipeline run on one series."""

    pipeline: str
    algorithm: AlgorithmInfo
    source_sop_instance_uids: list[str]
    segments: list[Segment] = field(default_factory=list)
    findings: list[ScoredFinding] = field(default_factory=list)
    status: ResultStatus = "assessed"
    reason: str | None = None  # why not assessable
    summary_text: str = ""
    source_frame_numbers: list[int] | None = None  # multi-frame sources only
    provenance: dict[str, Any] = field(default_factory=dict)
    # Sentences about this result as a whole that the SR states as text items, e.g.
    # which earlier result of the same series it supersedes (set by the node).
    notes: tuple[str, ...] = ()
    evidence: list[EvidenceMap] = field(default_factory=list)
    quality: QualityRecord | None = None

    def __post_init__(self) -> None:
        if self.status not in ("assessed", "not_assessable"):
            raise ValueError(f"unknown result status {self.status!r}")
        if self.status == "not_assessable" and not self.reason:
            raise ValueError("a not-assessable result needs its reason")
        _unique("segment", [s.key for s in self.segments])
        _unique("finding", [f.key for f in self.findings])
        keys = {s.key for s in self.segments}
        for f in self.findings:
            if f.segment is not None and f.segment not in keys:
                raise ValueError(f"finding {f.key!r} refers to no segment {f.segment!r}")
        _unique("evidence map", [e.key for e in self.evidence])
        fkeys = {f.key for f in self.findings}
        for e in self.evidence:
            missing = [k for k in e.findings if k not in fkeys]
            if missing:
                raise ValueError(f"evidence map {e.key!r} explains no finding {missing[0]!r}")

    @property
    def assessed(self) -> bool:
        return self.status == "assessed"

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The source grid the masks lie on, when there is any mask."""
        if self.segments:
            return tuple(self.segments[0].mask.shape)  # type: ignore[return-value]
        return None

    def segment(self, key: str) -> Segment | None:
        return next((s for s in self.segments if s.key == key), None)

    def finding_segments(self) -> list[Segment]:
        """Segments a finding refers to (the regions outlined as findings), in order."""
        wanted = {f.segment for f in self.findings if f.segment is not None}
        return [s for s in self.segments if s.key in wanted]

    def context_segments(self) -> list[Segment]:
        """Segments no finding refers to (anatomy shown for orientation), in order."""
        wanted = {f.segment for f in self.findings if f.segment is not None}
        return [s for s in self.segments if s.key not in wanted]

    def findings_on(self, key: str) -> list[ScoredFinding]:
        return [f for f in self.findings if f.segment == key]

    def summary(self) -> str:
        """The impression in one line: the pipeline's own words, else built from the findings."""
        if self.summary_text:
            return self.summary_text
        if not self.assessed:
            return f"Not assessable: {self.reason}"
        if not self.findings:
            return "Nothing found"
        return "; ".join(f.text or f"{f.label} probability {f.probability:.2f}"
                         for f in self.findings)


def _unique(what: str, keys: Sequence[str]) -> None:
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"{what} keys must be unique in a result: {', '.join(dupes)}")

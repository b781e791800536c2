"""What a pipeline hands to the DICOM writers and to the database: the result contract.

Every mask here lies on the *source* grid: axis 0 is the source slice order
given by ``source_sop_instance_uids`` (and ``source_frame_numbers`` for
multi-frame sources), axes 1 and 2 are the source rows and columns. The
pipelines produce it through the inverse of their preprocessing, so a writer
never resamples and a SEG frame always refers to the slice it was drawn on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "TUMOUR_TYPES",
    "AlgorithmInfo",
    "AnalysisResult",
    "Lesion",
    "PancreasLocation",
]

PancreasLocation = Literal["head", "neck", "body", "tail"]
# Class order of every tumour-type output (slice classifier and stage-2 head).
TUMOUR_TYPES: tuple[str, ...] = ("normal", "PDAC", "PNET", "IPMN", "other_benign")


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
    tracking_uid: str = ""  # filled by the writer if empty
    type_probabilities: dict[str, float] | None = None


@dataclass(slots=True)
class AnalysisResult:
    """The output of one pipeline run on one series."""

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

    @property
    def shape(self) -> tuple[int, int, int] | None:
        if self.pancreas_mask is not None:
            return tuple(self.pancreas_mask.shape)  # type: ignore[return-value]
        if self.lesions:
            return tuple(self.lesions[0].mask.shape)  # type: ignore[return-value]
        return None

    def summary(self) -> str:
        """One line per finding, the way the SR text and the CLI say it."""
        if not self.pancreas_found:
            return f"Pancreas not found; no assessment possible (score {self.patient_score:.2f})"
        if not self.lesions:
            return (
                f"No suspicious pancreatic lesion found (PDAC probability {self.patient_score:.2f})"
            )
        lines = []
        for les in self.lesions:
            where = f"pancreatic {les.location}" if les.location else "the pancreas region"
            lines.append(
                f"Suspicious lesion in {where}, {les.diameter_mm:.0f} mm, "
                f"probability {les.confidence:.2f}"
            )
        return "; ".join(lines)

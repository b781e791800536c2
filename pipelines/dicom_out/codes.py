"""Coded concepts the writers use, in one place so SEG, SR and GSPS say the same thing.

Why a module of constants: a PACS or a downstream reader matches findings by
code, not by label text, so the pancreas in the SEG and the finding site in
the SR must be the very same (scheme, value) pair. Where pydicom's code
dictionary has the concept it is taken from there, so a typo cannot slip in.
"""

from __future__ import annotations

from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes

from pipelines.results import PancreasLocation

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "ATTENUATION_MEAN",
    "FINDING_TYPE_NEOPLASM",
    "HOUNSFIELD_UNIT",
    "IMPRESSION",
    "LESION_CONFIDENCE",
    "LONG_AXIS",
    "MILLILITER",
    "MILLIMETER",
    "MORPHOLOGICALLY_ABNORMAL",
    "NEOPLASM",
    "NO_UNITS",
    "PANCREAS",
    "PDAC_PROBABILITY",
    "PROCEDURE_CT",
    "PROCEDURE_MR",
    "TUMOUR_TYPE_CONCEPTS",
    "VOLUME",
    "algorithm_family",
    "location_concept",
]


def _cc(code: object) -> CodedConcept:
    return CodedConcept.from_code(code)  # type: ignore[arg-type]


# Segmented property category / type (CID 7150 / 7151).
ANATOMICAL_STRUCTURE = _cc(codes.SCT.AnatomicalStructure)
MORPHOLOGICALLY_ABNORMAL = _cc(codes.SCT.MorphologicallyAbnormalStructure)
PANCREAS = _cc(codes.SCT.Pancreas)
NEOPLASM = _cc(codes.SCT.Neoplasm)
FINDING_TYPE_NEOPLASM = NEOPLASM

# Parts of the pancreas (SNOMED CT body structures). SNOMED has a "neck of
# pancreas" concept but its identifier is not in pydicom's dictionary and we
# would rather say "pancreas" than print an unverified code: the text label
# still names the neck.
_LOCATIONS: dict[str, CodedConcept] = {
    "head": CodedConcept("64163001", "SCT", "Head of pancreas"),
    "body": CodedConcept("40133006", "SCT", "Body of pancreas"),
    "tail": CodedConcept("73239005", "SCT", "Tail of pancreas"),
    "neck": PANCREAS,
}


def location_concept(location: PancreasLocation | None) -> CodedConcept:
    """The finding site for a lesion location; the whole pancreas when unknown."""
    if location is None:
        return PANCREAS
    return _LOCATIONS[location]


# Measurements (TID 1419 / 1501).
LONG_AXIS = _cc(codes.SCT.LongAxis)
VOLUME = _cc(codes.SCT.Volume)
ATTENUATION_MEAN = _cc(codes.DCM.MeanAttenuationCoefficient)
LESION_CONFIDENCE = _cc(codes.DCM.Probability)
PDAC_PROBABILITY = _cc(codes.DCM.ProbabilityOfCancer)
IMPRESSION = _cc(codes.DCM.Impression)

# Probabilities of each tumour type, in TUMOUR_TYPES order. Private to the
# node (coding scheme "99AINODE"): no standard code says "probability of PNET".
TUMOUR_TYPE_CONCEPTS: dict[str, CodedConcept] = {
    "normal": CodedConcept("TT-NORMAL", "99AINODE", "Probability of no pancreatic tumour"),
    "PDAC": CodedConcept("TT-PDAC", "99AINODE", "Probability of PDAC"),
    "PNET": CodedConcept("TT-PNET", "99AINODE", "Probability of PNET"),
    "IPMN": CodedConcept("TT-IPMN", "99AINODE", "Probability of IPMN"),
    "other_benign": CodedConcept("TT-OTHER", "99AINODE", "Probability of other benign lesion"),
}

# Units (UCUM).
MILLIMETER = _cc(codes.UCUM.Millimeter)
MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
HOUNSFIELD_UNIT = _cc(codes.UCUM.HounsfieldUnit)
NO_UNITS = _cc(codes.UCUM.NoUnits)

# Procedure reported (CID 100).
PROCEDURE_CT = CodedConcept("77477000", "SCT", "Computed Tomography")
PROCEDURE_MR = CodedConcept("113091000", "SCT", "Magnetic Resonance Imaging")


def algorithm_family(family: str) -> CodedConcept:
    """The algorithm family (CID 7162); everything this node runs is AI."""
    if family.lower() in ("artificial intelligence", "ai"):
        return _cc(codes.DCM.ArtificialIntelligence)
    return CodedConcept("123109", "DCM", "Manual Processing") if family.lower() == "manual" \
        else _cc(codes.DCM.ArtificialIntelligence)

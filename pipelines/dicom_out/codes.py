"""Coded concepts of the writers' own, and the one conversion of a result's codes.

Why a module: a PACS or a downstream reader matches findings by code, not by
label text, so every writer must turn a result's :class:`~pipelines.results.Code`
into the very same coded concept. What a segment or a finding *is* comes with
the result (the pipeline's codes); only the report's frame (impression,
procedure, algorithm family) is the writers' to say. Where pydicom's code
dictionary has the concept it is taken from there, so a typo cannot slip in.
"""

from __future__ import annotations

from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes

from pipelines.results import Code

__all__ = [
    "COMMENT",
    "IMPRESSION",
    "PROCEDURE_CT",
    "PROCEDURE_MR",
    "algorithm_family",
    "concept",
]


def _cc(code: object) -> CodedConcept:
    return CodedConcept.from_code(code)  # type: ignore[arg-type]


def concept(code: Code) -> CodedConcept:
    """The highdicom concept of a result's code."""
    return CodedConcept(code.value, code.scheme, code.meaning)


IMPRESSION = _cc(codes.DCM.Impression)
COMMENT = _cc(codes.DCM.Comment)  # the research-use statement and supersession notes

# Procedure reported (CID 100).
PROCEDURE_CT = CodedConcept("77477000", "SCT", "Computed Tomography")
PROCEDURE_MR = CodedConcept("113091000", "SCT", "Magnetic Resonance Imaging")


def algorithm_family(family: str) -> CodedConcept:
    """The algorithm family (CID 7162); everything this node runs is AI."""
    if family.lower() in ("artificial intelligence", "ai"):
        return _cc(codes.DCM.ArtificialIntelligence)
    return CodedConcept("123109", "DCM", "Manual Processing") if family.lower() == "manual" \
        else _cc(codes.DCM.ArtificialIntelligence)

"""The built-in writers (SEG, TID 1500 SR, GSPS, Secondary Captures, evidence maps).

Why here and not on the functions in seg.py, sr.py, gsps.py and sc.py: those
modules import highdicom (most of a second of start-up and tens of MB), and
the registry is read by the config check and by every receiver process. So
each entry below is a thin function that imports its writer only when it
writes; the facts about the kind stand beside it, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.dicom_out.registry import WriterContext, writer

if TYPE_CHECKING:
    import pydicom

__all__ = ["evsc", "gsps", "pmap", "sc", "seg", "sr"]

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


@writer("SEG", sop_classes=(SEGMENTATION,), series_offset=0, default=True,
        description="DICOM Segmentation of every segment")
def seg(ctx: WriterContext) -> pydicom.Dataset | None:
    from pipelines.dicom_out.seg import write_seg

    return write_seg(ctx.result, ctx.sources, fractional=bool(ctx.options.get("fractional")),
                     series_number=ctx.series_number)


# The other SR classes are other AI products' reports, which come back with a study.
@writer("SR", sop_classes=(COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR),
        series_offset=1, default=True, description="TID 1500 measurement report")
def sr(ctx: WriterContext) -> pydicom.Dataset:
    from pipelines.dicom_out.sr import write_sr

    return write_sr(ctx.result, ctx.sources, seg=ctx.first("SEG"),
                    series_number=ctx.series_number)


@writer("GSPS", sop_classes=(GRAYSCALE_PRESENTATION_STATE,), series_offset=2, default=True,
        description="presentation state outlining the finding regions")
def gsps(ctx: WriterContext) -> pydicom.Dataset | None:
    from pipelines.dicom_out.gsps import write_gsps

    return write_gsps(ctx.result, ctx.sources, series_number=ctx.series_number)


@writer("SC", sop_classes=(SECONDARY_CAPTURE,), series_offset=3, needs_pixels=True,
        description="Secondary Capture slices with the outlines burned in")
def sc(ctx: WriterContext) -> Sequence[pydicom.Dataset]:
    from pipelines.dicom_out.sc import write_sc

    return write_sc(ctx.result, ctx.sources, series_number=ctx.series_number)


# The evidence maps (issue 20): not defaults, a destination asks for them in `accepts`;
# only then does the job runner have the pipeline compute them (the Grad-CAM's cost).
EVIDENCE_KINDS = frozenset({"PMAP", "EVSC"})


@writer("PMAP", sop_classes=(PARAMETRIC_MAP,), series_offset=4,
        description="Parametric Maps of the evidence (lesion probability, Grad-CAM)")
def pmap(ctx: WriterContext) -> Sequence[pydicom.Dataset]:
    from pipelines.dicom_out.evidence import write_pmap

    return write_pmap(ctx.result, ctx.sources, series_number=ctx.series_number)


@writer("EVSC", sop_classes=(SECONDARY_CAPTURE,), series_offset=5, needs_pixels=True,
        description="Secondary Capture slices with the evidence map blended in colour")
def evsc(ctx: WriterContext) -> Sequence[pydicom.Dataset]:
    from pipelines.dicom_out.evidence import write_evidence_sc

    return write_evidence_sc(ctx.result, ctx.sources, series_number=ctx.series_number)

"""Secondary Capture slices with the outlines and a legend burned in.

Why burned in: the last resort for a PACS that shows neither SEG nor a
presentation state. The pixels are marked as derived, with burned-in
annotation, and say in the legend and in the header that they are not for
primary diagnosis: the original images stay the diagnostic ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipelines.dicom_out.common import stamp, to_display
from pipelines.dicom_out.render import CONTEXT_RGB, FINDING_RGB, compose
from pipelines.results import AnalysisResult
from storage.errors import PipelineError

__all__ = ["NOT_FOR_DIAGNOSIS", "write_sc"]

NOT_FOR_DIAGNOSIS = "AI OVERLAY - NOT FOR PRIMARY DIAGNOSIS"


def _orientation(ds: pydicom.Dataset) -> tuple[str, str]:
    """Patient orientation letters of the row and column directions (PS3.3 C.7.6.1.1.1)."""
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letters(vec: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(vec))
        out = ""
        for axis in order:
            if abs(vec[axis]) > 0.25:
                out += names[axis][0] if vec[axis] > 0 else names[axis][1]
        return out or "L"

    return letters(iop[:3]), letters(iop[3:])


def _legend(result: AnalysisResult, z: int) -> list[str]:
    """Product lines, then each finding region on this slice, then the series-level findings."""
    alg = result.algorithm
    lines = [f"{NOT_FOR_DIAGNOSIS} - {alg.name} {alg.version}"]
    for seg in result.finding_segments():
        if seg.mask[z].any():
            lines += [f.legend_text() for f in result.findings_on(seg.key)]
    lines += [f.legend_text() for f in result.findings if f.segment is None]
    return lines


def write_sc(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9003,
) -> list[pydicom.Dataset]:
    """One SC image per source slice that holds a finding region, all in one new series."""
    regions = result.finding_segments()
    context = result.context_segments()
    slices = [z for z in range(len(sources)) if any(s.mask[z].any() for s in regions)]
    if not slices:
        return []
    alg = result.algorithm
    series_uid = hd.UID()
    first = sources[0]
    out: list[pydicom.Dataset] = []
    for n, z in enumerate(slices, start=1):
        src = sources[z]
        # Regions after the context: where two outlines touch, the finding's wins.
        outlines = [(s.mask[z], CONTEXT_RGB) for s in context if s.mask[z].any()]
        outlines += [(s.mask[z], FINDING_RGB) for s in regions if s.mask[z].any()]
        labels = [(s.mask[z], f.caption_text()) for s in regions if s.mask[z].any()
                  for f in result.findings_on(s.key)[:1]]
        key = [(CONTEXT_RGB, s.label.lower()) for s in context]
        key += [(FINDING_RGB, (s.label.split() or ["finding"])[0].lower()) for s in regions]
        img = compose(to_display(src), outlines, _legend(result, z), labels=labels,
                      key=list(dict.fromkeys(key)))
        spacing = src.get("PixelSpacing")
        try:
            sc = hd.sc.SCImage(
                pixel_array=np.asarray(img, dtype=np.uint8),
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=str(first.StudyInstanceUID),
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=n,
                manufacturer=alg.manufacturer,
                patient_id=first.get("PatientID") or None,
                patient_name=first.get("PatientName") or None,
                patient_birth_date=first.get("PatientBirthDate") or None,
                patient_sex=first.get("PatientSex") or None,
                accession_number=first.get("AccessionNumber") or None,
                study_id=first.get("StudyID") or None,
                study_date=first.get("StudyDate") or None,
                study_time=first.get("StudyTime") or None,
                referring_physician_name=first.get("ReferringPhysicianName") or None,
                pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
                patient_orientation=_orientation(src),
            )
        except (ValueError, TypeError) as exc:
            raise PipelineError("write-sc", str(exc)) from exc
        stamp(sc, alg, "overlay SC", empty_laterality=True)
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. Derived from SOP instance {src.SOPInstanceUID}"
        sc.DerivationDescription = (
            f"Outlines by {alg.name} {alg.version} burned into the source slice; "
            "not for primary diagnosis")[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
        out.append(sc)
    return out

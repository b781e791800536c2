"""DICOM Segmentation of every segment of a result (anatomy and findings), via highdicom.

Why only the slices that hold a segment are handed to highdicom: the SEG
refers to source instances frame by frame anyway (empty frames are omitted),
and a 300-slice series with a 2 cm lesion would otherwise build and scan a
full (slices, rows, cols, segments) array for a few dozen frames. What each
segment is (its codes and label) comes with the result, from the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom

from pipelines.dicom_out import codes
from pipelines.dicom_out.common import (
    SegmentPlan,
    content_description,
    fill_tracking_uids,
    plan_segments,
    product_name,
    stamp,
)
from pipelines.results import AnalysisResult
from storage.errors import PipelineError

__all__ = ["segment_algorithm", "write_seg"]

log = logging.getLogger(__name__)


def segment_algorithm(result: AnalysisResult) -> hd.AlgorithmIdentificationSequence:
    alg = result.algorithm
    return hd.AlgorithmIdentificationSequence(
        name=alg.name,
        family=codes.algorithm_family(alg.family),
        version=alg.version,
        source=alg.manufacturer,
    )


def _descriptions(result: AnalysisResult, plan: SegmentPlan) -> list[hd.seg.SegmentDescription]:
    algorithm = segment_algorithm(result)
    out = []
    for seg in result.segments:
        number = plan.numbers.get(seg.key)
        if number is None:
            continue
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.label[:64],
            segmented_property_category=codes.concept(seg.category),
            segmented_property_type=codes.concept(seg.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=seg.tracking_uid or hd.UID(),
            tracking_id=seg.key,
            anatomic_regions=None if seg.anatomic_region is None
            else [codes.concept(seg.anatomic_region)],
        ))
    return out


def _stack(result: AnalysisResult, plan: SegmentPlan, fractional: bool
           ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.generic]]:
    """Slices that hold any segment, and (those slices, rows, cols, segments).

    BINARY is bool; FRACTIONAL is float32 0..1. A segment with a probability
    map carries it inside its own mask, so segment numbers mean the same in
    BINARY and FRACTIONAL; one without is 1 inside its mask.
    """
    segments = [s for s in result.segments if s.key in plan.numbers]
    masks = [s.mask for s in segments]
    occupied = np.zeros(masks[0].shape[0], dtype=bool)
    for m in masks:
        occupied |= m.reshape(m.shape[0], -1).any(axis=1)
    used = np.flatnonzero(occupied)
    dtype = np.float32 if fractional else np.bool_
    out = np.zeros((len(used), *masks[0].shape[1:], len(masks)), dtype=dtype)
    for k, seg in enumerate(segments):
        crop = seg.mask[used]
        if fractional and seg.probability is not None:
            out[..., k] = np.where(crop, seg.probability[used], 0)
        else:
            out[..., k] = crop
    return used, out


def write_seg(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    fractional: bool = False,
    series_number: int = 9000,
) -> pydicom.Dataset | None:
    """The SEG for ``result``; None when there is nothing to segment (no non-empty segment)."""
    result = fill_tracking_uids(result)
    plan = plan_segments(result)
    if not plan:
        log.info("no segment to write", extra={"pipeline": result.pipeline})
        return None
    used, pixels = _stack(result, plan, fractional)
    seg_type = (hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                else hd.seg.SegmentationTypeValues.BINARY)
    alg = result.algorithm
    try:
        seg = hd.seg.Segmentation(
            source_images=[sources[int(i)] for i in used],
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=_descriptions(result, plan),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=alg.manufacturer,
            manufacturer_model_name=product_name(alg)[:64],
            software_versions=alg.version,
            device_serial_number="0",
            content_description=content_description(alg, "Segmentation"),
            content_label="AINODE_SEG",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-seg", str(exc)) from exc
    stamp(seg, alg, "SEG")
    return seg

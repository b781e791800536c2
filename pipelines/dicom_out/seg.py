"""DICOM Segmentation of the pancreas and each lesion, written with highdicom.

Why only the slices that hold a segment are handed to highdicom: the SEG
refers to source instances frame by frame anyway (empty frames are omitted),
and a 300-slice series with a 2 cm lesion would otherwise build and scan a
full (slices, rows, cols, segments) array for a few dozen frames.
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
    if plan.pancreas is not None:
        out.append(hd.seg.SegmentDescription(
            segment_number=plan.pancreas,
            segment_label="Pancreas",
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.PANCREAS,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id="pancreas",
        ))
    for les in result.lesions:
        number = plan.lesions.get(les.index)
        if number is None:
            continue
        where = f" ({les.location})" if les.location else ""
        out.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"Lesion {les.index}{where} p={les.confidence:.2f}"[:64],
            segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL,
            segmented_property_type=codes.NEOPLASM,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=les.tracking_uid,
            tracking_id=f"lesion-{les.index}",
            anatomic_regions=[codes.location_concept(les.location)],
        ))
    return out


def _layers(result: AnalysisResult, plan: SegmentPlan) -> list[npt.NDArray[np.bool_]]:
    masks = []
    if plan.pancreas is not None and result.pancreas_mask is not None:
        masks.append(result.pancreas_mask)
    masks += [les.mask for les in result.lesions if les.index in plan.lesions]
    return masks


def _stack(result: AnalysisResult, plan: SegmentPlan, fractional: bool
           ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.generic]]:
    """Slices that hold any segment, and (those slices, rows, cols, segments).

    BINARY is bool; FRACTIONAL is float32 0..1. Each lesion's fractional
    segment carries the probability map inside its own mask, so segment
    numbers mean the same in BINARY and FRACTIONAL.
    """
    masks = _layers(result, plan)
    occupied = np.zeros(masks[0].shape[0], dtype=bool)
    for m in masks:
        occupied |= m.reshape(m.shape[0], -1).any(axis=1)
    used = np.flatnonzero(occupied)
    dtype = np.float32 if fractional else np.bool_
    out = np.zeros((len(used), *masks[0].shape[1:], len(masks)), dtype=dtype)
    n_pancreas = 1 if plan.pancreas is not None else 0
    for k, m in enumerate(masks):
        crop = m[used]
        if fractional and k >= n_pancreas and result.lesion_probability is not None:
            out[..., k] = np.where(crop, result.lesion_probability[used], 0)
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
    """The SEG for ``result``; None when there is nothing to segment (no pancreas, no lesion)."""
    result = fill_tracking_uids(result)
    plan = plan_segments(result)
    if plan.pancreas is None and not plan.lesions:
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
            content_description=f"{alg.name} {alg.version}; {alg.intended_use}"[:64],
            content_label="AINODE_SEG",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-seg", str(exc)) from exc
    stamp(seg, alg, "SEG")
    return seg

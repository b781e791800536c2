"""Results as DICOM: SEG, TID 1500 SR, GSPS outlines and Secondary Capture, via highdicom.

The caller saves each WrittenObject with ``FileStore.write_result`` and records
an Output row; ``node.send`` then sends each kind to the destinations that
accept it. Every object lands in the source study, in a new series whose
description names the product and the model version.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import pydicom

from pipelines.dicom_out.common import check_sources, fill_tracking_uids
from pipelines.dicom_out.gsps import write_gsps
from pipelines.dicom_out.sc import write_sc
from pipelines.dicom_out.seg import write_seg
from pipelines.dicom_out.sr import write_sr
from pipelines.results import AnalysisResult
from storage.errors import InputError

__all__ = ["KINDS", "Kind", "WrittenObject", "write_results"]

log = logging.getLogger(__name__)

Kind = Literal["SEG", "SR", "GSPS", "SC"]
KINDS: tuple[Kind, ...] = ("SEG", "SR", "GSPS", "SC")


@dataclass(frozen=True)
class WrittenObject:
    kind: Kind
    dataset: pydicom.Dataset


def write_results(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    kinds: Collection[str],
    *,
    fractional: bool = False,
    series_number_base: int = 9000,
) -> list[WrittenObject]:
    """Write the requested kinds for one analysis; kinds with nothing to show are skipped.

    ``sources`` are the source instances in mask axis-0 order (SC needs their
    pixel data). A negative study yields an SR (it says nothing was found, with
    the score) and, when the pancreas was segmented, a SEG; no GSPS or SC.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown result kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    check_sources(result, sources)
    result = fill_tracking_uids(result)
    out: list[WrittenObject] = []
    seg = None
    if "SEG" in kinds:
        seg = write_seg(result, sources, fractional=fractional,
                        series_number=series_number_base)
        if seg is not None:
            out.append(WrittenObject("SEG", seg))
    if "SR" in kinds:
        sr = write_sr(result, sources, seg=seg, series_number=series_number_base + 1)
        out.append(WrittenObject("SR", sr))
    if "GSPS" in kinds:
        pr = write_gsps(result, sources, series_number=series_number_base + 2)
        if pr is not None:
            out.append(WrittenObject("GSPS", pr))
    if "SC" in kinds:
        out.extend(WrittenObject("SC", ds) for ds in
                   write_sc(result, sources, series_number=series_number_base + 3))
    log.info("wrote result objects", extra={
        "pipeline": result.pipeline,
        "kinds": ",".join(cast(str, w.kind) for w in out),
    })
    return out

"""Results as DICOM: SEG, TID 1500 SR, GSPS outlines, Secondary Capture, and plug-in kinds.

The caller saves each WrittenObject with ``FileStore.write_result`` and records
an Output row; ``node.send`` then sends each kind to the destinations that
accept it. Every object lands in the source study, in a new series whose
description names the product and the model version. Which kinds exist, in
which order they are written and which series number each gets comes from
``pipelines.dicom_out.registry``; this package stays light to import (the
writers' highdicom is imported when one writes).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.dicom_out import registry
from storage.errors import InputError, PipelineError

if TYPE_CHECKING:  # pydicom too waits until one writes: the config imports this package
    import pydicom

    from pipelines.results import AnalysisResult

__all__ = ["WrittenObject", "write_results"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenObject:
    kind: str
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
    pixel data). A result with no finding region yields an SR (it says what
    was found, or why nothing could be assessed) and, when there is a context
    segment, a SEG; no GSPS or SC.
    """
    import pydicom

    from pipelines.dicom_out.common import check_sources, fill_tracking_uids

    known = registry.kinds()
    unknown = set(kinds) - set(known)
    if unknown:
        raise InputError(f"unknown result kinds {sorted(unknown)}; known: {', '.join(known)}")
    check_sources(result, sources)
    result = fill_tracking_uids(result)
    out: list[WrittenObject] = []
    written: dict[str, list[pydicom.Dataset]] = {}
    for spec in registry.specs():
        if spec.kind not in kinds:
            continue
        ctx = registry.WriterContext(result, sources, series_number_base + spec.series_offset,
                                     {"fractional": fractional}, dict(written))
        got = spec.write(ctx)
        objs = [] if got is None else [got] if isinstance(got, pydicom.Dataset) else list(got)
        bad = [type(o).__name__ for o in objs if not isinstance(o, pydicom.Dataset)]
        if bad:
            raise PipelineError(f"write-{spec.kind.lower()}",
                                f"writer {spec.origin} returned {', '.join(bad)}, not datasets")
        written[spec.kind] = objs
        out.extend(WrittenObject(spec.kind, ds) for ds in objs)
    log.info("wrote result objects", extra={
        "pipeline": result.pipeline, "kinds": ",".join(w.kind for w in out),
    })
    return out

"""What every writer shares: equipment identity, series naming, segment numbering, outlines.

Why shared: the SR refers to SEG segments by number and the GSPS and the
Secondary Capture draw the same outlines, so numbering and contour tracing
must come from one function, not four copies that drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom import UID
from scipy import ndimage
from skimage import measure

from pipelines.results import RESEARCH_DISCLAIMER, AlgorithmInfo, AnalysisResult
from storage.errors import InputError

__all__ = [
    "DESCRIPTION_DISCLAIMER",
    "NODE_VERSION",
    "SegmentPlan",
    "check_sources",
    "content_description",
    "contours",
    "decoded_pixels",
    "edge_mask",
    "fill_tracking_uids",
    "plan_segments",
    "product_name",
    "series_description",
    "stamp",
    "to_display",
]

PRODUCT = "dicom-ai-node"


def _product_version() -> str:
    """The installed distribution's version (pyproject.toml), the one the CLI prints too."""
    try:
        return version(PRODUCT)
    except PackageNotFoundError:  # run from a tree that was never installed
        return "0+unknown"

NODE_VERSION: str = _product_version()


def product_name(algorithm: AlgorithmInfo) -> str:
    return f"{PRODUCT} {algorithm.name}"


# Ends every Series Description: the part a 64-character LO must never cut.
DESCRIPTION_DISCLAIMER = " - research, not for diagnosis"


def series_description(algorithm: AlgorithmInfo, kind: str) -> str:
    """Object kind, algorithm and model version, then the disclaimer, in the 64 of LO.

    Why the disclaimer goes last but is kept whole: the viewer's series list
    shows this field, so it must say research use on every object; a long
    algorithm name is what gets shortened.
    """
    name = algorithm.name.removeprefix("ainode ")  # the Manufacturer already says who
    head = f"{kind} {name} {algorithm.version}"
    room = 64 - len(DESCRIPTION_DISCLAIMER)
    if len(head) > room:
        head = head[:room].rstrip()
    return head + DESCRIPTION_DISCLAIMER


def content_description(algorithm: AlgorithmInfo, what: str) -> str:
    """SEG/GSPS Content Description (LO): the disclaimer first, so it is never the cut part."""
    return f"{RESEARCH_DISCLAIMER}. {what} by {algorithm.name} {algorithm.version}"[:64]


def stamp(ds: pydicom.Dataset, algorithm: AlgorithmInfo, kind: str,
          *, empty_laterality: bool = False) -> None:
    """Series description and software versions, the same on every object we write.

    ``empty_laterality``: General Series Laterality is Type 2C and dciodvfy
    cannot evaluate its condition on a PR or SC; present and empty satisfies it.
    """
    ds.SeriesDescription = series_description(algorithm, kind)
    ds.SoftwareVersions = [algorithm.version, NODE_VERSION]
    if empty_laterality:
        ds.Laterality = None


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """Segment key -> SEG segment number; the SEG writes it and the SR refers to it."""

    numbers: dict[str, int]

    def __bool__(self) -> bool:
        return bool(self.numbers)


def plan_segments(result: AnalysisResult) -> SegmentPlan:
    """Each non-empty segment in the result's order, numbered from 1 (empty ones get none)."""
    keys = [s.key for s in result.segments if s.mask.any()]
    return SegmentPlan({key: n for n, key in enumerate(keys, start=1)})


def fill_tracking_uids(result: AnalysisResult) -> AnalysisResult:
    """A copy whose segments and findings all carry a tracking UID.

    The SEG segment and the SR group of one finding must share its tracking
    UID, so it is minted once, before any writer runs (one a finding brings
    serves its segment too); any other finding gets its own.
    """
    if all(s.tracking_uid for s in result.segments) and \
            all(f.tracking_uid for f in result.findings):
        return result
    given = {f.segment: f.tracking_uid for f in result.findings if f.segment and f.tracking_uid}
    segments = [s if s.tracking_uid else replace(s, tracking_uid=given.get(s.key) or str(UID()))
                for s in result.segments]
    by_key = {s.key: s.tracking_uid for s in segments}
    findings = [f if f.tracking_uid else replace(
        f, tracking_uid=by_key.get(f.segment or "", "") or str(UID()))
        for f in result.findings]
    return replace(result, segments=segments, findings=findings)


def check_sources(result: AnalysisResult, sources: Sequence[pydicom.Dataset]) -> None:
    """Refuse sources that are not the slices the masks were drawn on, in that order."""
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if uids != list(result.source_sop_instance_uids):
        raise InputError(
            "sources do not match result.source_sop_instance_uids "
            f"({len(uids)} given, {len(result.source_sop_instance_uids)} expected, "
            "or a different order)"
        )
    shape = result.shape
    odd = [s.key for s in result.segments if s.mask.shape != shape
           or (s.probability is not None and s.probability.shape != shape)]
    if odd:
        raise InputError(f"segments {', '.join(odd)} do not lie on the grid {shape} of the first")
    for e in result.evidence:
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        if e.values.shape != (len(uids), rows, cols):
            raise InputError(f"evidence map {e.key} is {e.values.shape}, not on the source grid "
                             f"{(len(uids), rows, cols)}")
    if shape is not None and shape[0] != len(uids):
        raise InputError(f"masks have {shape[0]} slices but {len(uids)} sources were given")
    if shape is not None:
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        if (rows, cols) != shape[1:]:
            raise InputError(f"masks are {shape[1:]} but the source images are {(rows, cols)}")


def edge_mask(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The mask's own boundary pixels (inside the mask, touching the outside)."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return np.asarray(mask & ~eroded, dtype=bool)


def contours(mask: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.float32]]:
    """Closed outlines of a 2D mask as (N, 2) arrays of (column, row) in GSPS PIXEL units.

    PS3.3 C.10.5.1.2: the top-left corner of the top-left pixel is 0\\0, so a
    pixel centre (r, c) is (c + 0.5, r + 0.5). The mask is padded so that an
    object touching the image border still gets a closed outline.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    out = []
    for c in measure.find_contours(padded, 0.5):
        if len(c) < 3:
            continue
        rows = np.clip(c[:, 0] - 1 + 0.5, 0, mask.shape[0])
        cols = np.clip(c[:, 1] - 1 + 0.5, 0, mask.shape[1])
        pts = np.stack([cols, rows], axis=1).astype(np.float32)
        if not np.array_equal(pts[0], pts[-1]):
            pts = np.vstack([pts, pts[:1]])
        out.append(pts)
    return out


def decoded_pixels(ds: pydicom.Dataset) -> npt.NDArray[Any]:
    """The pixel array, or InputError in one line naming the instance and its encoding.

    Why: pydicom raises ValueError, RuntimeError or NotImplementedError (no
    decoder for the transfer syntax, truncated or corrupt pixel data), which
    would reach the admin as a traceback from ``ainode render``.
    """
    try:
        return np.asarray(ds.pixel_array)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError,
            TypeError) as exc:
        meta = getattr(ds, "file_meta", None)
        ts = getattr(meta, "TransferSyntaxUID", None)
        name = getattr(ts, "name", "") or str(ts or "unknown")
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"cannot decode the pixels of instance {ds.get('SOPInstanceUID', '?')} "
                         f"(transfer syntax {name}): {reason}") from exc


def to_display(ds: pydicom.Dataset, window: tuple[float, float] | None = None
               ) -> npt.NDArray[np.uint8]:
    """A source slice as 8-bit grey, windowed the way a reader would first see it.

    Uses the modality LUT (HU for CT), then the given window, else the
    source's first window, else the full range of the slice.
    """
    arr = pydicom.pixels.apply_modality_lut(decoded_pixels(ds), ds).astype(np.float32)
    if window is None:
        wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
        if wc is not None and ww is not None:
            wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
            ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
            window = (wc, max(ww, 1.0))
    if window is None:
        lo, hi = float(arr.min()), float(arr.max())
    else:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    scaled = (arr - lo) / max(hi - lo, 1e-6)
    return np.asarray(np.clip(scaled * 255.0, 0, 255).astype(np.uint8))

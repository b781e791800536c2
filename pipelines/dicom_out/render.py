"""Outlines and finding text burned into 8-bit RGB slices: for the SC series and for PNGs.

Why one drawing routine for both: what an engineer checks with ``ainode
render`` must be exactly what a PACS without SEG support shows in the
Secondary Capture series. Outlines are drawn pixel-exactly on the mask's
boundary pixels (no resampling), so a test can check them against the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes

from pipelines.dicom_out.common import edge_mask, to_display
from storage.errors import InputError

__all__ = [
    "CONTEXT_RGB",
    "FINDING_RGB",
    "Layer",
    "compose",
    "masks_from_seg",
    "render_pngs",
]

log = logging.getLogger(__name__)

FINDING_RGB: tuple[int, int, int] = (255, 0, 0)  # a region a finding was measured on
CONTEXT_RGB: tuple[int, int, int] = (0, 255, 0)  # anatomy shown for orientation
_ANATOMY = codes.SCT.AnatomicalStructure.value
_LEGEND_BG = (0, 0, 0)
_LEGEND_FG = (255, 255, 0)


@dataclass(frozen=True, slots=True)
class Layer:
    """One outlined structure on the source grid: (slices, rows, cols) mask and colour."""

    label: str
    mask: npt.NDArray[np.bool_]
    rgb: tuple[int, int, int]


def compose(gray: npt.NDArray[np.uint8], outlines: Sequence[tuple[npt.NDArray[np.bool_],
            tuple[int, int, int]]], legend: Sequence[str]) -> Image.Image:
    """An RGB image: ``gray`` with each mask's boundary pixels painted, legend at the bottom.

    Later outlines win where two touch (findings are passed after the context).
    """
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for mask, colour in outlines:
        rgb[edge_mask(mask)] = colour
    img = Image.fromarray(rgb, mode="RGB")
    if legend:
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        line_h = 12
        height = line_h * len(legend) + 6
        top = img.height - height
        width = min(img.width, 8 + 7 * max(len(t) for t in legend))
        draw.rectangle([0, top, width, img.height - 1], fill=_LEGEND_BG)
        for i, text in enumerate(legend):
            draw.text((4, top + 3 + i * line_h), text, fill=_LEGEND_FG, font=font)
    return img


def masks_from_seg(seg_ds: pydicom.Dataset, source_uids: Sequence[str]) -> list[Layer]:
    """Each SEG segment as a mask on the given source slices (slices it skips stay empty).

    An anatomical structure (property category SCT 91723000) is drawn as
    context, anything else as a finding: the SEG does not say which segments
    a finding was measured on, and the node's own SEGs code them that way.
    """
    seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=False)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    present = [u for u in source_uids if u in referenced]
    if not present:
        raise InputError("the segmentation refers to none of the series' instances")
    numbers = list(seg.segment_numbers)
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=present, segment_numbers=numbers,
        combine_segments=False, assert_missing_frames_are_empty=True,
    )
    index = {u: i for i, u in enumerate(source_uids)}
    layers = []
    for k, number in enumerate(numbers):
        full = np.zeros((len(source_uids), *arr.shape[1:3]), dtype=bool)
        for j, uid in enumerate(present):
            full[index[uid]] = arr[j, :, :, k] > 0
        desc = seg.get_segment_description(number)
        label = str(desc.segment_label)
        anatomy = str(desc.segmented_property_category.value) == _ANATOMY
        layers.append(Layer(label, full, CONTEXT_RGB if anatomy else FINDING_RGB))
    return layers


def render_pngs(
    sources: Sequence[pydicom.Dataset],
    layers: Sequence[Layer],
    legend: Sequence[str],
    out_dir: Path,
    *,
    all_slices: bool = False,
) -> list[Path]:
    """One PNG per slice that shows an outline (or every slice); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for z, src in enumerate(sources):
        outlines = [(layer.mask[z], layer.rgb) for layer in layers if layer.mask[z].any()]
        if not outlines and not all_slices:
            continue
        img = compose(to_display(src), outlines, legend)
        path = out_dir / f"slice_{z:04d}_{src.SOPInstanceUID}.png"
        img.save(path)
        written.append(path)
    log.info("rendered %d slices", len(written), extra={"out": str(out_dir)})
    return written

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
    "PlacedText",
    "TextLayout",
    "compose",
    "font_for",
    "layout",
    "legend_key",
    "masks_from_seg",
    "numbers",
    "render_pngs",
    "wrap",
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


def font_for(width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The burned-in font, sized with the image: about 1/36 of its width, 8 px at least.

    Why scaled: a fixed 11 px font is a quarter of a 132-px thumbnail's width per
    few words and unreadably small on a 1024-px image.
    """
    return ImageFont.load_default(size=max(8, round(width / 36)))


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> float:
    return float(font.getlength(text))


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
         max_width: float) -> list[str]:
    """Greedy word wrap measured with the font; a word wider than a line is split."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while _text_width(font, word) > max_width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > max_width:
                cut -= 1
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{current} {word}".strip()
        if _text_width(font, trial) <= max_width:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


@dataclass(frozen=True, slots=True)
class PlacedText:
    """One line of burned-in text: where it starts (x, y) and what it says."""

    x: int
    y: int
    text: str


@dataclass(frozen=True, slots=True)
class TextLayout:
    """Where every burned-in line goes; computed before drawing, so a test can measure it."""

    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    band_height: int  # rows added below the image for the legend
    legend: tuple[PlacedText, ...]
    labels: tuple[PlacedText, ...]  # numbers beside the outlines, on the image
    keys: tuple[tuple[int, int, int, tuple[int, int, int], str], ...]  # swatch x, y, size, rgb

    def right_edges(self) -> list[float]:
        """The right end of every line, as the font draws it (its bounding box)."""
        return [p.x + float(self.font.getbbox(p.text)[2])
                for p in (*self.legend, *self.labels)]


def _label_spot(mask: npt.NDArray[np.bool_], text: str, font: ImageFont.FreeTypeFont
                | ImageFont.ImageFont, width: int, height: int) -> PlacedText:
    """Beside the outline: to its right, else to its left, always inside the image."""
    rows, cols = np.nonzero(mask)
    left, top, right = int(cols.min()), int(rows.min()), int(cols.max())
    w = _text_width(font, text)
    bbox = font.getbbox(text)
    h = int(bbox[3])
    x = right + 3 if right + 3 + w <= width - 1 else left - 3 - w
    x = int(min(max(x, 1), width - 1 - w))
    y = int(min(max(top - h // 2, 1), height - 1 - h))
    return PlacedText(x, y, text)


def layout(width: int, height: int, legend: Sequence[str],
           labels: Sequence[tuple[npt.NDArray[np.bool_], str]] = (),
           key: Sequence[tuple[tuple[int, int, int], str]] = ()) -> TextLayout:
    """The legend wrapped to the width on a band below the image, numbers by the outlines.

    The band is outside the anatomy by construction: the source pixels keep
    their rows and columns, so outlines stay pixel-exact on the mask edges.
    """
    font = font_for(width)
    margin = max(2, width // 100)
    line_h = int(font.getbbox("Ag")[3]) + max(1, width // 200)
    placed: list[PlacedText] = []
    keys: list[tuple[int, int, int, tuple[int, int, int], str]] = []
    y = margin
    if key:
        swatch = max(4, line_h - 4)
        x = margin
        for rgb, name in key:
            need = swatch + 3 + _text_width(font, name) + 2 * margin
            if x > margin and x + need > width - margin:
                x, y = margin, y + line_h
            keys.append((x, y + (line_h - swatch) // 2, swatch, rgb, name))
            placed.append(PlacedText(int(x + swatch + 3), y, name))
            x += int(need)
        y += line_h
    for text in legend:
        for line in wrap(text, font, width - 2 * margin):
            placed.append(PlacedText(margin, y, line))
            y += line_h
    band = y + margin if placed else 0
    spots = tuple(_label_spot(m, t, font, width, height) for m, t in labels if m.any())
    return TextLayout(font, band, tuple(placed), spots, tuple(keys))


def compose(gray: npt.NDArray[np.uint8], outlines: Sequence[tuple[npt.NDArray[np.bool_],
            tuple[int, int, int]]], legend: Sequence[str],
            labels: Sequence[tuple[npt.NDArray[np.bool_], str]] = (),
            key: Sequence[tuple[tuple[int, int, int], str]] = ()) -> Image.Image:
    """An RGB image: ``gray`` with outlines and numbers, the legend on a band below it.

    ``labels``: (mask, text) drawn beside each outline (the lesion's number);
    ``key``: (colour, name) swatches heading the legend. Outlines are painted
    last, so they stay exactly on the mask edges even where a number touches
    them; later outlines win where two touch (findings come after the context).
    """
    height, width = gray.shape[:2]
    plan = layout(width, height, legend, labels, key)
    img = Image.new("RGB", (width, height + plan.band_height), _LEGEND_BG)
    base = Image.fromarray(gray, mode="RGB") if gray.ndim == 3 else \
        Image.fromarray(gray, mode="L").convert("RGB")  # RGB: an evidence blend
    img.paste(base, (0, 0))
    draw = ImageDraw.Draw(img)
    stroke = 1 if width >= 200 else 0
    for p in plan.labels:
        draw.text((p.x, p.y), p.text, fill=_LEGEND_FG, font=plan.font,
                  stroke_width=stroke, stroke_fill=_LEGEND_BG)
    for p in plan.legend:
        draw.text((p.x, height + p.y), p.text, fill=_LEGEND_FG, font=plan.font)
    for x, y, size, rgb, _ in plan.keys:
        # Swatches are a shade off the outline colours, so a pixel of pure
        # FINDING_RGB / CONTEXT_RGB is always an outline pixel.
        shade = tuple(max(0, c - 40) if c else 0 for c in rgb)
        draw.rectangle([x, height + y, x + size, height + y + size], fill=shade)
    rgb_px = np.asarray(img).copy()
    for mask, colour in outlines:
        rgb_px[:height][edge_mask(mask)] = colour
    return Image.fromarray(rgb_px, mode="RGB")


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


def _word(label: str) -> str:
    return (label.split() or ["finding"])[0].lower()


def legend_key(layers: Sequence[Layer]) -> list[tuple[tuple[int, int, int], str]]:
    """One swatch per kind of outline: each anatomy by name, then the findings' word."""
    key: list[tuple[tuple[int, int, int], str]] = []
    for layer in layers:
        entry = (layer.rgb, layer.label.lower() if layer.rgb == CONTEXT_RGB
                 else _word(layer.label))
        if entry not in key:
            key.append(entry)
    return key


def numbers(layers: Sequence[Layer], z: int) -> list[tuple[npt.NDArray[np.bool_], str]]:
    """Each finding outline on slice ``z`` with its number (1, 2 ... in the SEG's order).

    The SEG numbers findings in the result's order, which is the pipeline's
    numbering (the legend's "1: neck, 33 mm"), so the PNG says what the SC says.
    """
    findings = [layer for layer in layers if layer.rgb != CONTEXT_RGB]
    return [(layer.mask[z], str(n)) for n, layer in enumerate(findings, start=1)
            if layer.mask[z].any()]


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
        img = compose(to_display(src), outlines, legend, labels=numbers(layers, z),
                      key=legend_key(layers))
        path = out_dir / f"slice_{z:04d}_{src.SOPInstanceUID}.png"
        img.save(path)
        written.append(path)
    log.info("rendered %d slices", len(written), extra={"out": str(out_dir)})
    return written

"""Grayscale Softcopy Presentation State outlining each finding region on the source images.

Why GSPS as well as SEG: many PACS viewers do not display SEG but every one
applies a presentation state, so the outline reaches the radiologist either
way. Outlines are closed polylines in image pixel coordinates on the very
source instance they were drawn on, with a short text label beside each.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)

from pipelines.dicom_out.common import (
    content_description,
    contours,
    fill_tracking_uids,
    product_name,
    stamp,
)
from pipelines.results import AnalysisResult
from storage.errors import PipelineError

__all__ = ["write_gsps"]

_FINDING_COLOUR = hd.color.CIELabColor(53.2, 80.1, 67.2)  # red
_CONTEXT_COLOUR = hd.color.CIELabColor(87.7, -86.2, 83.2)  # green


def _anchor(outlines: list[npt.NDArray[np.float32]], src: pydicom.Dataset) -> tuple[float, float]:
    """Just above the topmost outline, kept inside the image."""
    top = min(outlines, key=lambda p: float(p[:, 1].min()))
    col = float(np.clip(top[:, 0].mean(), 1, float(src.Columns) - 1))
    row = float(np.clip(top[:, 1].min() - 6, 1, float(src.Rows) - 1))
    return col, row


def write_gsps(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9002,
    include_context: bool = False,
) -> pydicom.Dataset | None:
    """The presentation state; None when no finding region (and no context asked for) is drawn.

    Finding regions (segments a finding refers to) are outlined with the
    finding's caption beside them; ``include_context`` adds the other
    segments (anatomy) on a layer of their own.
    """
    result = fill_tracking_uids(result)
    finding_layer = GraphicLayer("LESIONS", order=1, description="AI lesion outlines",
                                 display_color=_FINDING_COLOUR)
    context_layer = GraphicLayer("ANATOMY", order=2, description="AI anatomy outlines",
                                 display_color=_CONTEXT_COLOUR)
    regions = [(seg, result.findings_on(seg.key)) for seg in result.finding_segments()]
    context = result.context_segments() if include_context else []
    annotations: list[GraphicAnnotation] = []
    used_context = False
    for z, src in enumerate(sources):
        objects: list[GraphicObject] = []
        texts: list[TextObject] = []
        for seg, findings in regions:
            if not seg.mask[z].any():
                continue
            outlines = contours(seg.mask[z])
            for pts in outlines:
                objects.append(GraphicObject(
                    graphic_type=GraphicTypeValues.POLYLINE, graphic_data=pts,
                    units=AnnotationUnitsValues.PIXEL,
                    tracking_id=seg.key, tracking_uid=seg.tracking_uid,
                ))
            texts += [TextObject(text_value=f.legend_text()[:64],
                                 units=AnnotationUnitsValues.PIXEL,
                                 anchor_point=_anchor(outlines, src),
                                 anchor_point_visible=False) for f in findings[:1]]
        if objects:
            annotations.append(GraphicAnnotation(
                referenced_images=[src], graphic_layer=finding_layer,
                graphic_objects=objects, text_objects=texts,
            ))
        drawn = [pts for seg in context if seg.mask[z].any() for pts in contours(seg.mask[z])]
        if drawn:
            used_context = True
            annotations.append(GraphicAnnotation(
                referenced_images=[src], graphic_layer=context_layer,
                graphic_objects=[
                    GraphicObject(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=pts,
                                  units=AnnotationUnitsValues.PIXEL)
                    for pts in drawn
                ],
            ))
    if not annotations:
        return None
    alg = result.algorithm
    layers = [finding_layer] + ([context_layer] if used_context else [])
    if not any(a.GraphicLayer == "LESIONS" for a in annotations):
        layers = [context_layer]
    try:
        pr = GrayscaleSoftcopyPresentationState(
            referenced_images=list(sources),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=alg.manufacturer,
            manufacturer_model_name=product_name(alg)[:64],
            software_versions=alg.version,
            device_serial_number="0",
            content_label="AINODE_OUTLINES",
            content_description=content_description(alg, "Outlines"),
            graphic_annotations=annotations,
            graphic_layers=layers,
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-gsps", str(exc)) from exc
    stamp(pr, alg, "GSPS", empty_laterality=True)
    return pr

"""Grayscale Softcopy Presentation State outlining each lesion on the source images.

Why GSPS as well as SEG: many PACS viewers do not display SEG but every one
applies a presentation state, so the outline reaches the radiologist either
way. Outlines are closed polylines in image pixel coordinates on the very
source instance they were drawn on, with a short text label beside each.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
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
    contours,
    fill_tracking_uids,
    product_name,
    stamp,
)
from pipelines.results import AnalysisResult
from storage.errors import PipelineError

__all__ = ["write_gsps"]

_LESION_COLOUR = hd.color.CIELabColor(53.2, 80.1, 67.2)  # red
_PANCREAS_COLOUR = hd.color.CIELabColor(87.7, -86.2, 83.2)  # green


def write_gsps(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    series_number: int = 9002,
    include_pancreas: bool = False,
) -> pydicom.Dataset | None:
    """The presentation state; None when no lesion (and no pancreas asked for) is drawn."""
    result = fill_tracking_uids(result)
    lesion_layer = GraphicLayer("LESIONS", order=1, description="AI lesion outlines",
                                display_color=_LESION_COLOUR)
    pancreas_layer = GraphicLayer("PANCREAS", order=2, description="AI pancreas outline",
                                  display_color=_PANCREAS_COLOUR)
    annotations: list[GraphicAnnotation] = []
    used_pancreas = False
    for z, src in enumerate(sources):
        objects: list[GraphicObject] = []
        texts: list[TextObject] = []
        for les in result.lesions:
            if not les.mask[z].any():
                continue
            outlines = contours(les.mask[z])
            for pts in outlines:
                objects.append(GraphicObject(
                    graphic_type=GraphicTypeValues.POLYLINE, graphic_data=pts,
                    units=AnnotationUnitsValues.PIXEL,
                    tracking_id=f"lesion-{les.index}", tracking_uid=les.tracking_uid,
                ))
            top = min(outlines, key=lambda p: float(p[:, 1].min()))
            col = float(np.clip(top[:, 0].mean(), 1, float(src.Columns) - 1))
            row = float(np.clip(top[:, 1].min() - 6, 1, float(src.Rows) - 1))
            texts.append(TextObject(
                text_value=f"L{les.index} p={les.confidence:.2f}",
                units=AnnotationUnitsValues.PIXEL, anchor_point=(col, row),
                anchor_point_visible=False,
            ))
        if objects:
            annotations.append(GraphicAnnotation(
                referenced_images=[src], graphic_layer=lesion_layer,
                graphic_objects=objects, text_objects=texts,
            ))
        if include_pancreas and result.pancreas_mask is not None and result.pancreas_mask[z].any():
            used_pancreas = True
            annotations.append(GraphicAnnotation(
                referenced_images=[src], graphic_layer=pancreas_layer,
                graphic_objects=[
                    GraphicObject(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=pts,
                                  units=AnnotationUnitsValues.PIXEL)
                    for pts in contours(result.pancreas_mask[z])
                ],
            ))
    if not annotations:
        return None
    alg = result.algorithm
    layers = [lesion_layer] + ([pancreas_layer] if used_pancreas else [])
    if not any(a.GraphicLayer == "LESIONS" for a in annotations):
        layers = [pancreas_layer]
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
            content_description=f"{alg.name} {alg.version} lesion outlines"[:64],
            graphic_annotations=annotations,
            graphic_layers=layers,
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-gsps", str(exc)) from exc
    stamp(pr, alg, "GSPS", empty_laterality=True)
    return pr

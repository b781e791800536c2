"""Evidence maps as DICOM: a Parametric Map per map, and colour-blended Secondary Captures.

Why two kinds: a Parametric Map (PS3.3 A.75) keeps the values (0..1 per
voxel, on the source slices, each frame referring to the slice it lies on),
so a viewer that shows PMAPs can overlay it, window it and read values; many
PACS show none of SEG, PMAP or presentation states, so the same evidence is
also burned into colour Secondary Capture slices (``EVSC``), marked derived
and not for primary diagnosis, like the outline SC. Destinations take either
by naming the kind in ``accepts``; neither is a default.

The values are stored as 16-bit unsigned integers with a real-world value
mapping (slope 1/65535): integer parametric maps are what most viewers that
show PMAPs at all can decode; float pixel data is rarer.
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
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipelines.dicom_out import codes
from pipelines.dicom_out.common import content_description, product_name, stamp, to_display
from pipelines.results import NO_UNITS, AnalysisResult, EvidenceMap
from storage.errors import PipelineError

__all__ = [
    "LESION_OUTLINE_RGB",
    "MIN_VISIBLE",
    "blend",
    "evidence_slices",
    "heat",
    "read_pmap",
    "render_evidence_pngs",
    "write_evidence_sc",
    "write_pmap",
]

log = logging.getLogger(__name__)

STORED_MAX = 65535
MIN_VISIBLE = 1.0 / 255.0  # below this a value would not change one 8-bit display level
ALPHA = 0.5  # how much of a fully attributed pixel's colour is the map's
LESION_OUTLINE_RGB: tuple[int, int, int] = (0, 255, 255)  # lesion map >= 0.5, on the SC
LESION_MAP_LEVEL = 0.5


def evidence_slices(values: npt.NDArray[np.float32]) -> list[int]:
    """The source slices on which a map shows anything (a value of at least MIN_VISIBLE)."""
    flat = values.reshape(values.shape[0], -1)
    return [int(z) for z in np.flatnonzero(flat.max(axis=1) >= MIN_VISIBLE)]


def heat(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """A 'hot' colour scale (black, red, yellow, white) of 0..1 values: (..., 3) uint8."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                   axis=-1)
    return np.asarray(np.round(rgb * 255), np.uint8)


def blend(gray: npt.NDArray[np.uint8], values: npt.NDArray[np.floating],
          alpha: float = ALPHA) -> npt.NDArray[np.uint8]:
    """The grey slice with the map's colour laid over it, weighted by the value itself.

    A pixel without evidence keeps its grey exactly, so the anatomy stays
    readable around the coloured region.
    """
    g = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    w = alpha * np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    w = np.where(w * 255.0 >= alpha, w, 0.0)  # below MIN_VISIBLE: untouched
    out = (1.0 - w) * g + w * heat(values).astype(np.float32)
    return np.asarray(np.clip(np.round(out), 0, 255), np.uint8)


def _mapping(ev: EvidenceMap) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=ev.key[:16],
        lut_explanation=ev.label[:64],
        unit=codes.concept(NO_UNITS),
        value_range=(0, STORED_MAX),
        slope=1.0 / STORED_MAX,
        intercept=0.0,
        quantity_definition=codes.concept(ev.quantity),
    )


def _pmap(result: AnalysisResult, sources: Sequence[pydicom.Dataset], ev: EvidenceMap,
          series_uid: str, series_number: int, number: int) -> pydicom.Dataset | None:
    used = evidence_slices(ev.values)
    if not used:
        return None
    stored = np.round(np.clip(ev.values[used], 0.0, 1.0) * STORED_MAX).astype(np.uint16)
    alg = result.algorithm
    try:
        pm = hd.pm.ParametricMap(
            source_images=[sources[z] for z in used],
            pixel_array=stored,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=number,
            manufacturer=alg.manufacturer,
            manufacturer_model_name=product_name(alg)[:64],
            software_versions=alg.version,
            device_serial_number="0",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[_mapping(ev)],
            content_description=content_description(alg, ev.label)[:64],
            content_label=f"AINODE_{ev.quantity.value.split('-')[-1]}"[:16],
            voi_lut_transformations=[hd.VOILUTTransformation(
                window_center=STORED_MAX / 2, window_width=STORED_MAX)],
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-pmap", str(exc)) from exc
    stamp(pm, alg, "evidence PMAP", empty_laterality=True)
    pm.DerivationDescription = (f"{ev.label}: {ev.method}" if ev.method else ev.label)[:1024]
    return pm


def write_pmap(result: AnalysisResult, sources: Sequence[pydicom.Dataset], *,
               series_number: int = 9004) -> list[pydicom.Dataset]:
    """One Parametric Map per evidence map of ``result``, all in one new series.

    Multi-frame sources are not mapped here (each PMAP frame must name its
    source frame); the result then gets no PMAP, and the log says why.
    """
    if not result.evidence or not result.assessed:
        return []
    if result.source_frame_numbers is not None:
        log.warning("no evidence PMAP for a multi-frame source series",
                    extra={"pipeline": result.pipeline})
        return []
    series_uid = hd.UID()
    out: list[pydicom.Dataset] = []
    for ev in result.evidence:
        pm = _pmap(result, sources, ev, series_uid, series_number, len(out) + 1)
        if pm is not None:
            out.append(pm)
    return out


def _sc_slices(result: AnalysisResult, attribution: EvidenceMap) -> list[int]:
    """Slices with a finding region; with none, the slice of the strongest attribution."""
    regions = result.finding_segments()
    slices = [z for z in range(attribution.values.shape[0])
              if any(s.mask[z].any() for s in regions)]
    if slices:
        return slices
    flat = attribution.values.reshape(attribution.values.shape[0], -1)
    best = int(np.argmax(flat.sum(axis=1)))
    return [best] if flat[best].max() >= MIN_VISIBLE else []


def evidence_legend(result: AnalysisResult, attribution: EvidenceMap,
                    lesion_map: EvidenceMap | None) -> list[str]:
    """What the colours and the outline mean, then the findings they explain."""
    from pipelines.dicom_out.sc import NOT_FOR_DIAGNOSIS

    alg = result.algorithm
    lines = [f"{NOT_FOR_DIAGNOSIS} - {alg.name} {alg.version}",
             f"Colour: {attribution.label}, black-red-yellow-white = weakest-strongest"]
    if lesion_map is not None:
        lines.append(f"Cyan outline: {lesion_map.label.lower()} >= {LESION_MAP_LEVEL:.1f}")
    lines += [f.legend_text() for f in result.findings]
    return lines


def write_evidence_sc(result: AnalysisResult, sources: Sequence[pydicom.Dataset], *,
                      series_number: int = 9005) -> list[pydicom.Dataset]:
    """Colour SC slices: the attribution blended over the source, the lesion map outlined."""
    from pipelines.dicom_out.render import compose
    from pipelines.dicom_out.sc import NOT_FOR_DIAGNOSIS, _orientation

    if not result.assessed:
        return []
    by_key = {e.key: e for e in result.evidence}
    attribution = by_key.get("gradcam") or next(iter(by_key.values()), None)
    if attribution is None:
        return []
    lesion_map = by_key.get("lesion-probability")
    if lesion_map is attribution:
        lesion_map = None
    slices = _sc_slices(result, attribution)
    alg = result.algorithm
    series_uid = hd.UID()
    first = sources[0]
    legend = evidence_legend(result, attribution, lesion_map)
    out: list[pydicom.Dataset] = []
    for n, z in enumerate(slices, start=1):
        src = sources[z]
        rgb = blend(to_display(src), attribution.values[z])
        outlines = []
        if lesion_map is not None and (lesion_map.values[z] >= LESION_MAP_LEVEL).any():
            outlines.append((lesion_map.values[z] >= LESION_MAP_LEVEL, LESION_OUTLINE_RGB))
        img = compose(rgb, outlines, legend)
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
            raise PipelineError("write-evsc", str(exc)) from exc
        stamp(sc, alg, "evidence SC", empty_laterality=True)
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = (f"{NOT_FOR_DIAGNOSIS}. Evidence map derived from SOP instance "
                            f"{src.SOPInstanceUID}")
        sc.DerivationDescription = (
            f"{attribution.label} ({attribution.method}) blended in colour over the source "
            f"slice by {alg.name} {alg.version}; not for primary diagnosis")[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
        out.append(sc)
    return out


@dataclass(frozen=True)
class ReadMap:
    """A Parametric Map read back: its label, what it shows, its values per source slice."""

    label: str
    quantity: str  # the code value of its quantity definition, e.g. "EV-GRADCAM"
    values: dict[str, npt.NDArray[np.float32]]  # source SOP Instance UID -> (rows, cols)


def read_pmap(ds: pydicom.Dataset) -> ReadMap:
    """A PMAP's frames as real-world values by the source instance each frame names."""
    from pipelines.dicom_out.common import decoded_pixels

    shared = ds.SharedFunctionalGroupsSequence[0]
    rwv = shared.RealWorldValueMappingSequence[0]
    slope = float(rwv.get("RealWorldValueSlope", 1.0))
    intercept = float(rwv.get("RealWorldValueIntercept", 0.0))
    quantity = ""
    qd = rwv.get("QuantityDefinitionSequence")
    if qd:
        concept = qd[0].get("ConceptCodeSequence")
        quantity = str(concept[0].CodeValue) if concept else ""
    arr = decoded_pixels(ds)
    if arr.ndim == 2:
        arr = arr[None]
    values = {}
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0]
                  .ReferencedSOPInstanceUID)
        values[uid] = (arr[i].astype(np.float32) * slope + intercept).astype(np.float32)
    return ReadMap(str(rwv.get("LUTExplanation", ds.get("ContentLabel", "evidence"))),
                   quantity, values)


def render_evidence_pngs(sources: Sequence[pydicom.Dataset], maps: Sequence[ReadMap],
                         legend: Sequence[str], out_dir: Path) -> list[Path]:
    """PNGs of what the evidence SC shows, from the PMAPs the node wrote for the series.

    The colour is the Grad-CAM map (else the first map), the cyan outline the
    lesion map at 0.5, as on the EVSC slices; one PNG per slice the colour map
    covers with anything visible.
    """
    from pipelines.dicom_out.render import compose

    colour = next((m for m in maps if m.quantity == "EV-GRADCAM"), maps[0] if maps else None)
    if colour is None:
        return []
    outline = next((m for m in maps if m.quantity == "EV-LESPROB" and m is not colour), None)
    lines = [*legend, f"Colour: {colour.label}, black-red-yellow-white = weakest-strongest"]
    if outline is not None:
        lines.append(f"Cyan outline: {outline.label.lower()} >= {LESION_MAP_LEVEL:.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for z, src in enumerate(sources):
        uid = str(src.SOPInstanceUID)
        values = colour.values.get(uid)
        if values is None or values.max() < MIN_VISIBLE:
            continue
        rgb = blend(to_display(src), values)
        outlines = []
        if outline is not None and uid in outline.values:
            edge = outline.values[uid] >= LESION_MAP_LEVEL
            if edge.any():
                outlines.append((edge, LESION_OUTLINE_RGB))
        path = out_dir / f"evidence_{z:04d}_{uid}.png"
        compose(rgb, outlines, lines).save(path)
        written.append(path)
    return written

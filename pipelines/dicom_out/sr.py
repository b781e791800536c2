"""TID 1500 measurement report (Comprehensive 3D SR): the findings in words and numbers.

Why TID 1500 with one group per finding, referencing its SEG segment when it
has one: a viewer or a registry can then show "lesion 1: 23 mm, p=0.92" and
jump to the voxels it was measured on. Each group carries the finding's size
(long axis, volume), its score (its concept and probability), its further
measurements and its sentence. The series-level group (the first finding measured on no
segment; one is made when there is none) also carries the one-line
impression, so a negative or not-assessable study still says, in a report,
what was looked for and what came of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    ReferencedSegment,
    RelationshipTypeValues,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes as pcodes

from pipelines.dicom_out import codes
from pipelines.dicom_out.common import (
    fill_tracking_uids,
    plan_segments,
    product_name,
    stamp,
)
from pipelines.results import (
    LONG_AXIS,
    MILLILITER,
    MILLIMETER,
    NO_UNITS,
    RESEARCH_DISCLAIMER,
    VOLUME,
    AnalysisResult,
    ScoredFinding,
    people_probability,
)
from storage.errors import PipelineError

__all__ = ["write_sr"]

SERIES_LEVEL = "patient-level"  # tracking identifier of a group made for the impression


def _text(value: str, name: object = None) -> TextContentItem:
    return TextContentItem(
        name=name or codes.IMPRESSION, value=value[:1024],  # type: ignore[arg-type]
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _people(value: float, unit: object) -> float:
    """Unitless scores (probabilities, confidences) as people read them: 0.59."""
    return (people_probability(value) or 0.0) if unit == NO_UNITS else value


def _measurements(f: ScoredFinding, alg: AlgorithmIdentification,
                  sites: list[FindingSite] | None) -> list[Measurement]:
    """The size (long axis, volume), the score, then the finding's own measurements."""
    items = []
    if f.size_mm is not None:
        items.append((LONG_AXIS, float(f.size_mm), MILLIMETER))
    if f.volume_ml is not None:
        items.append((VOLUME, float(f.volume_ml), MILLILITER))
    items.append((f.concept, float(f.probability), NO_UNITS))
    items += [(m.concept, float(m.value), m.unit) for m in f.measurements]
    return [Measurement(name=codes.concept(name), value=_people(value, unit),
                        unit=codes.concept(unit),
                        algorithm_id=alg, finding_sites=sites)
            for name, value, unit in items]


def _group(f: ScoredFinding, alg: AlgorithmIdentification, seg: pydicom.Dataset | None,
           number: int | None) -> object:
    """A TID 1411 volumetric group when its segment was written, else a TID 1501 group.

    Without a SEG (a destination that takes SR only) a finding's group has no
    image reference, rather than pointing at an object the PACS will never get.
    """
    sites = [FindingSite(codes.concept(f.site))] if f.site is not None else None
    tracking = TrackingIdentifier(uid=f.tracking_uid or hd.UID(), identifier=f.key)
    finding_type = codes.concept(f.finding_type) if f.finding_type is not None else None
    # The series-level score names its site on the group only, as TID 1501 has it.
    m_sites = sites if f.segment is not None else None
    measurements = _measurements(f, alg, m_sites)
    if seg is not None and number is not None:
        return VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=ReferencedSegment.from_segmentation(seg, number),
            finding_type=finding_type,
            algorithm_id=alg,
            finding_sites=sites,
            measurements=measurements,
        )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_type,
        algorithm_id=alg,
        finding_sites=sites,
        measurements=measurements,
    )


def write_sr(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    seg: pydicom.Dataset | None = None,
    series_number: int = 9001,
) -> pydicom.Dataset:
    """The measurement report; each finding refers to its segment in ``seg`` when given."""
    result = fill_tracking_uids(result)
    algo = result.algorithm
    alg = AlgorithmIdentification(name=algo.name, version=algo.version,
                                  family=codes.algorithm_family(algo.family),
                                  manufacturer=algo.manufacturer)
    plan = plan_segments(result)
    modality = str(sources[0].get("Modality", "CT"))
    procedure = codes.PROCEDURE_MR if modality == "MR" else codes.PROCEDURE_CT

    series_level = next((f for f in result.findings if f.segment is None), None)
    # The report's own words, in the series-level group: what the result is (research
    # output), then what it supersedes, then the impression.
    frame = [_text(f"{RESEARCH_DISCLAIMER}: research output of {algo.name} "
                   f"{algo.version}, not reviewed by a physician.", codes.COMMENT)]
    frame += [_text(note, codes.COMMENT) for note in result.notes]
    frame.append(_text(result.summary()))
    groups: list[object] = []
    if series_level is None:
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=SERIES_LEVEL),
            algorithm_id=alg,
        ))
        groups[0][0].ContentSequence.extend(frame)  # type: ignore[index]
    for f in result.findings:
        number = plan.numbers.get(f.segment) if f.segment is not None else None
        group = _group(f, alg, seg, number)
        if f.text:
            group[0].ContentSequence.append(_text(f.text))  # type: ignore[index]
        if f is series_level:
            group[0].ContentSequence.extend(frame)  # type: ignore[index]
        groups.append(group)

    observer = ObserverContext(
        observer_type=pcodes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=algo.name[:64], manufacturer_name=algo.manufacturer,
            model_name=product_name(algo)[:64],
        ),
    )
    try:
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups,  # type: ignore[arg-type]
        )
        evidence = list(sources) + ([seg] if seg is not None else [])
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=algo.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
        )
    except (ValueError, TypeError) as exc:
        raise PipelineError("write-sr", str(exc)) from exc
    stamp(sr, algo, "SR")
    return sr

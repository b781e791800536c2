"""TID 1500 measurement report (Comprehensive 3D SR): the findings in words and numbers.

Why TID 1500 with one group per lesion referencing its SEG segment: a viewer
or a registry can then show "lesion 1: 23 mm, p=0.92" and jump to the voxels
it was measured on. The patient-level group carries the PDAC probability
(and the tumour-type probabilities when the classifier ran) plus the one-line
impression, so a negative study still says, in a report, what was looked for
and what score it got.
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
from pipelines.results import AnalysisResult, Lesion
from storage.errors import PipelineError

__all__ = ["lesion_text", "write_sr"]


def lesion_text(les: Lesion) -> str:
    where = f"pancreatic {les.location}" if les.location else "the pancreas region"
    return (f"Suspicious lesion in {where}, {les.diameter_mm:.0f} mm, "
            f"probability {les.confidence:.2f}")


def _text(value: str) -> TextContentItem:
    return TextContentItem(
        name=codes.IMPRESSION, value=value[:1024],
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _lesion_measurements(les: Lesion, alg: AlgorithmIdentification, site: FindingSite
                         ) -> list[Measurement]:
    out = [
        Measurement(name=codes.LONG_AXIS, value=float(les.diameter_mm), unit=codes.MILLIMETER,
                    algorithm_id=alg, finding_sites=[site]),
        Measurement(name=codes.VOLUME, value=float(les.volume_ml), unit=codes.MILLILITER,
                    algorithm_id=alg, finding_sites=[site]),
        Measurement(name=codes.LESION_CONFIDENCE, value=float(les.confidence),
                    unit=codes.NO_UNITS, algorithm_id=alg, finding_sites=[site]),
    ]
    if les.mean_hu is not None:
        out.append(Measurement(name=codes.ATTENUATION_MEAN, value=float(les.mean_hu),
                               unit=codes.HOUNSFIELD_UNIT, algorithm_id=alg,
                               finding_sites=[site]))
    for tumour, p in (les.type_probabilities or {}).items():
        if tumour in codes.TUMOUR_TYPE_CONCEPTS:
            out.append(Measurement(name=codes.TUMOUR_TYPE_CONCEPTS[tumour], value=float(p),
                                   unit=codes.NO_UNITS, algorithm_id=alg,
                                   finding_sites=[site]))
    return out


def write_sr(
    result: AnalysisResult,
    sources: Sequence[pydicom.Dataset],
    *,
    seg: pydicom.Dataset | None = None,
    series_number: int = 9001,
) -> pydicom.Dataset:
    """The measurement report; each lesion refers to its segment in ``seg`` when given.

    Without a SEG (a destination that takes SR only) lesion groups are TID 1501
    groups without an image reference, rather than pointing at an object the
    PACS will never receive.
    """
    result = fill_tracking_uids(result)
    algo = result.algorithm
    alg = AlgorithmIdentification(name=algo.name, version=algo.version,
                                  family=codes.algorithm_family(algo.family),
                                  manufacturer=algo.manufacturer)
    plan = plan_segments(result)
    modality = str(sources[0].get("Modality", "CT"))
    procedure = codes.PROCEDURE_MR if modality == "MR" else codes.PROCEDURE_CT

    patient = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="patient-level"),
        algorithm_id=alg,
        finding_sites=[FindingSite(codes.PANCREAS)],
        measurements=[
            Measurement(name=codes.PDAC_PROBABILITY, value=float(result.patient_score),
                        unit=codes.NO_UNITS, algorithm_id=alg),
            *[Measurement(name=codes.TUMOUR_TYPE_CONCEPTS[k], value=float(v),
                          unit=codes.NO_UNITS, algorithm_id=alg)
              for k, v in (result.classification or {}).items()
              if k in codes.TUMOUR_TYPE_CONCEPTS],
        ],
    )
    patient[0].ContentSequence.append(_text(result.summary()))
    groups: list[object] = [patient]

    for les in result.lesions:
        site = FindingSite(codes.location_concept(les.location))
        tracking = TrackingIdentifier(uid=les.tracking_uid, identifier=f"lesion-{les.index}")
        measurements = _lesion_measurements(les, alg, site)
        number = plan.lesions.get(les.index)
        group: object
        if seg is not None and number is not None:
            group = VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=ReferencedSegment.from_segmentation(seg, number),
                finding_type=codes.FINDING_TYPE_NEOPLASM,
                algorithm_id=alg,
                finding_sites=[site],
                measurements=measurements,
            )
        else:
            group = MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=codes.FINDING_TYPE_NEOPLASM,
                algorithm_id=alg,
                finding_sites=[site],
                measurements=measurements,
            )
        group[0].ContentSequence.append(_text(lesion_text(les)))  # type: ignore[index]
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

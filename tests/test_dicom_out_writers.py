"""SEG, SR, GSPS and SC written for a real CT with masks on known slices.

Each object is validated by dciodvfy (dicom3tools, a validator nobody here
wrote) and read back with highdicom/pydicom to the same masks on the same
source SOP Instance UIDs.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon2mask

from pipelines.dicom_out import WrittenObject, write_results
from pipelines.dicom_out.render import FINDING_RGB
from pipelines.dicom_out.sc import NOT_FOR_DIAGNOSIS
from pipelines.pancreas.output import Lesion, PancreasReport
from pipelines.results import AlgorithmInfo, AnalysisResult
from storage.errors import InputError
from tests.support.data import dicom_series_dir
from tests.support.peers import require

pytestmark = pytest.mark.peers

# Slices (axis 0, sorted by position) the masks are placed on.
PANCREAS_SLICES = range(8, 16)
LESION1_SLICES = range(10, 13)
LESION2_SLICE = 14
LESION1_TRACKING_UID = "2.25.184015196311432107365463372862163436441"


def load_sorted(name: str) -> list[pydicom.Dataset]:
    files = sorted(dicom_series_dir(name).glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_sorted("ct_phantom_philips")


def make_result(sources: Sequence[pydicom.Dataset]) -> PancreasReport:
    """The pancreas pipeline's report; its ``to_result()`` is what the writers get."""
    n, rows, cols = len(sources), int(sources[0].Rows), int(sources[0].Columns)
    pan = np.zeros((n, rows, cols), bool)
    pan[PANCREAS_SLICES.start:PANCREAS_SLICES.stop, 200:300, 180:350] = True
    l1 = np.zeros_like(pan)
    l1[LESION1_SLICES.start:LESION1_SLICES.stop, 230:260, 200:240] = True
    l1[11, 235:245, 240:250] = True  # not a box on every slice
    l2 = np.zeros_like(pan)
    l2[LESION2_SLICE, 250:270, 300:330] = True
    prob = np.zeros(pan.shape, np.float32)
    prob[l1] = 0.9
    prob[l2] = 0.6
    return PancreasReport(
        pipeline="pancreas-ct",
        algorithm=AlgorithmInfo("ainode pancreas-ct", "0.1.0-test"),
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in sources],
        patient_score=0.93,
        pancreas_found=True,
        pancreas_mask=pan,
        lesion_probability=prob,
        lesions=[
            Lesion(1, l1, 0.92, 23.0, 1.2, (0.0, 0.0, 0.0), "head", -20.5,
                   tracking_uid=LESION1_TRACKING_UID),
            Lesion(2, l2, 0.61, 9.0, 0.1, (0.0, 0.0, 0.0), "tail", 35.0,
                   type_probabilities={"PDAC": 0.7, "PNET": 0.3}),
        ],
        classification={"normal": 0.05, "PDAC": 0.8, "PNET": 0.1, "IPMN": 0.03,
                        "other_benign": 0.02},
    )


def dciodvfy(ds: pydicom.Dataset, path: Path) -> list[str]:
    """Errors reported by dciodvfy; the warnings are printed for the record."""
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([require("dciodvfy"), "-new", str(path)], capture_output=True,
                          text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {ds.Modality}: {line}")
    return [line for line in lines if line.startswith("Error")]


def by_kind(objs: Sequence[WrittenObject], kind: str) -> list[pydicom.Dataset]:
    return [o.dataset for o in objs if o.kind == kind]


@pytest.fixture(scope="module")
def written(sources: list[pydicom.Dataset]) -> tuple[PancreasReport, list[WrittenObject]]:
    result = make_result(sources)
    return result, write_results(result.to_result(), sources, {"SEG", "SR", "GSPS", "SC"})


def test_every_object_passes_dciodvfy(written: tuple[PancreasReport, list[WrittenObject]],
                                      tmp_path: Path) -> None:
    _, objs = written
    assert sorted({o.kind for o in objs}) == ["GSPS", "SC", "SEG", "SR"]
    for i, obj in enumerate(objs):
        errors = dciodvfy(obj.dataset, tmp_path / f"{obj.kind}-{i}.dcm")
        assert errors == [], f"{obj.kind}: {errors}"


def test_all_objects_in_source_study_new_series(
        written: tuple[PancreasReport, list[WrittenObject]],
        sources: list[pydicom.Dataset]) -> None:
    _, objs = written
    for obj in objs:
        ds = obj.dataset
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
        assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
        assert "0.1.0-test" in ds.SeriesDescription
        assert "0.1.0-test" in ds.SoftwareVersions


def test_seg_reads_back_to_same_masks(written: tuple[PancreasReport, list[WrittenObject]],
                                      sources: list[pydicom.Dataset], tmp_path: Path) -> None:
    result, objs = written
    (seg_ds,) = by_kind(objs, "SEG")
    path = tmp_path / "seg.dcm"
    seg_ds.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    # Empty frames omitted: only the pancreas and lesion slices are referenced.
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    expected = {str(sources[z].SOPInstanceUID) for z in PANCREAS_SLICES}
    assert referenced == expected
    uids = [str(sources[z].SOPInstanceUID) for z in PANCREAS_SLICES]
    arr = seg.get_pixels_by_source_instance(uids, combine_segments=False,
                                            assert_missing_frames_are_empty=True)
    zs = list(PANCREAS_SLICES)
    assert np.array_equal(arr[..., 0] > 0, result.pancreas_mask[zs])  # type: ignore[index]
    assert np.array_equal(arr[..., 1] > 0, result.lesions[0].mask[zs])
    assert np.array_equal(arr[..., 2] > 0, result.lesions[1].mask[zs])
    d1 = seg.get_segment_description(2)
    assert d1.segmented_property_type.value == "108369006"  # SNOMED CT neoplasm
    assert seg.get_segment_description(1).segmented_property_type.value == "15776009"
    alg = d1.algorithm_identification
    assert alg is not None and alg[0].AlgorithmName == "ainode pancreas-ct"
    assert alg[0].AlgorithmVersion == "0.1.0-test"
    assert d1.tracking_uid == LESION1_TRACKING_UID  # kept when the pipeline gave one
    assert hd.UID(seg.get_segment_description(3).tracking_uid)  # minted when it did not


def test_fractional_seg_carries_probabilities(sources: list[pydicom.Dataset],
                                              tmp_path: Path) -> None:
    result = make_result(sources)
    (obj,) = write_results(result.to_result(), sources, {"SEG"}, fractional=True)
    assert dciodvfy(obj.dataset, tmp_path / "segf.dcm") == []
    seg = hd.seg.segread(tmp_path / "segf.dcm")
    assert seg.SegmentationType == "FRACTIONAL"
    uid = str(sources[LESION2_SLICE].SOPInstanceUID)
    arr = seg.get_pixels_by_source_instance([uid], segment_numbers=[3], combine_segments=False,
                                            dtype=np.float32,
                                            assert_missing_frames_are_empty=True)
    values = arr[0, :, :, 0]
    mask = result.lesions[1].mask[LESION2_SLICE]
    assert np.allclose(values[mask], 0.6, atol=1 / 255)
    assert np.all(values[~mask] == 0)


def _content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_content_items(item))
    return out


def test_sr_tid1500_reads_back(written: tuple[PancreasReport, list[WrittenObject]],
                               tmp_path: Path) -> None:
    result, objs = written
    (sr_ds,) = by_kind(objs, "SR")
    (seg_ds,) = by_kind(objs, "SEG")
    sr_ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = _content_items(sr)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert "Suspicious lesion 1 in pancreatic head, 23 mm, lesion confidence 0.92" in texts
    assert result.summary() in texts
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    for group, les, number in zip(groups, result.lesions, (2, 3), strict=True):
        # One lesion, one tracking UID, in the SEG segment and the SR group alike.
        assert group.tracking_uid == seg.get_segment_description(number).tracking_uid
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Long axis"] == pytest.approx(les.diameter_mm)
        assert values["Volume"] == pytest.approx(les.volume_ml)
        assert values["Lesion confidence"] == round(les.confidence, 2)  # as people read it
        assert values["Mean Attenuation Coefficient"] == pytest.approx(les.mean_hu)
        sites = [s.value.value for s in group.finding_sites]
        assert sites == [{"head": "64163001", "tail": "73239005"}[les.location or ""]]
    assert report.get_observer_contexts()  # the device observer is recorded
    (patient,) = report.get_image_measurement_groups()
    assert patient.tracking_identifier == "patient-level"
    pdac = [i for i in items if i.ValueType == "NUM"
            and i.ConceptNameCodeSequence[0].CodeValue == "PT-PDAC"]
    assert len(pdac) == 1
    assert float(pdac[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.93)
    # Algorithm identification (TID 4019: 111001 name, 111003 version) on every measurement.
    nums = [i for i in items if i.ValueType == "NUM"]
    assert len(nums) == 1 + 5 + 4 + 6  # patient + types, lesion 1, lesion 2 (+ 2 types)
    for num in nums:
        alg = {c.ConceptNameCodeSequence[0].CodeValue: c.get("TextValue")
               for c in num.ContentSequence}
        assert alg["111001"] == "ainode pancreas-ct" and alg["111003"] == "0.1.0-test"
    at_patient = {m.name.value: m.value for m in patient.get_measurements()}
    assert at_patient["PT-PDAC"] == pytest.approx(0.93)
    assert {k: at_patient[f"TT-{k.upper()}"] for k in ("PDAC", "PNET", "IPMN")} == \
        pytest.approx({"PDAC": 0.8, "PNET": 0.1, "IPMN": 0.03})


def test_negative_study_still_gets_a_report(sources: list[pydicom.Dataset],
                                            tmp_path: Path) -> None:
    result = dataclasses.replace(make_result(sources), lesions=[], patient_score=0.07,
                                 classification=None, lesion_probability=None)
    objs = write_results(result.to_result(), sources, {"SEG", "SR", "GSPS", "SC"})
    assert sorted(o.kind for o in objs) == ["SEG", "SR"]  # nothing to outline
    (sr_ds,) = by_kind(objs, "SR")
    assert dciodvfy(sr_ds, tmp_path / "neg.dcm") == []
    texts = [i.TextValue for i in _content_items(sr_ds) if i.ValueType == "TEXT"
             and i.ConceptNameCodeSequence[0].CodeValue == "121073"]  # Impression
    assert texts == ["No suspicious pancreatic lesion found; patient-level PDAC probability 0.07"]


def test_not_assessable_result_says_so_in_the_sr(sources: list[pydicom.Dataset],
                                                 tmp_path: Path) -> None:
    """A generic result that scored nothing: the SR alone, with the reason as its impression."""
    result = AnalysisResult(
        pipeline="any", algorithm=AlgorithmInfo("ainode any", "1"),
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in sources],
        status="not_assessable", reason="the series does not cover the abdomen",
    )
    objs = write_results(result, sources, {"SEG", "SR", "GSPS", "SC"})
    assert [o.kind for o in objs] == ["SR"]
    assert dciodvfy(objs[0].dataset, tmp_path / "na.dcm") == []
    texts = [i.TextValue for i in _content_items(objs[0].dataset) if i.ValueType == "TEXT"
             and i.ConceptNameCodeSequence[0].CodeValue == "121073"]
    assert texts == ["Not assessable: the series does not cover the abdomen"]


def _raster(polylines: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill GSPS polylines (PIXEL units, pixel-edge coordinates) back into a mask.

    Pixel (r, c) is inside when its centre, (c + .5, r + .5) in PIXEL units, is.
    """
    out = np.zeros(shape, bool)
    for pts in polylines:
        out ^= polygon2mask(shape, np.stack([pts[:, 1] - 0.5, pts[:, 0] - 0.5], axis=1))
    return out


def test_gsps_outlines_match_lesion_masks(written: tuple[PancreasReport, list[WrittenObject]],
                                          sources: list[pydicom.Dataset]) -> None:
    result, objs = written
    (pr,) = by_kind(objs, "GSPS")
    uid_to_z = {str(d.SOPInstanceUID): z for z, d in enumerate(sources)}
    seen = set()
    for ann in pr.GraphicAnnotationSequence:
        (ref,) = ann.ReferencedImageSequence
        z = uid_to_z[ref.ReferencedSOPInstanceUID]
        seen.add(z)
        polys = [np.array(g.GraphicData, dtype=np.float32).reshape(-1, 2)
                 for g in ann.GraphicObjectSequence]
        assert all(g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL"
                   for g in ann.GraphicObjectSequence)
        expected = np.zeros(sources[0].pixel_array.shape, bool)
        for les in result.lesions:
            expected |= les.mask[z]
        drawn = _raster(polys, expected.shape)
        assert np.array_equal(drawn, expected), f"slice {z}"
        assert any("conf 0.92" in t.UnformattedTextValue or "conf 0.61" in t.UnformattedTextValue
                   for t in ann.TextObjectSequence)
    assert seen == {*LESION1_SLICES, LESION2_SLICE}


def test_sc_burns_outline_and_legend(written: tuple[PancreasReport, list[WrittenObject]],
                                     sources: list[pydicom.Dataset], tmp_path: Path) -> None:
    result, objs = written
    scs = by_kind(objs, "SC")
    assert len(scs) == len({*LESION1_SLICES, LESION2_SLICE})
    uid_to_z = {str(d.SOPInstanceUID): z for z, d in enumerate(sources)}
    from scipy import ndimage
    for sc in scs:
        assert sc.BurnedInAnnotation == "YES"
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert NOT_FOR_DIAGNOSIS in sc.ImageComments
        assert "not for primary diagnosis" in sc.DerivationDescription
        z = uid_to_z[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        path = tmp_path / f"sc{z}.dcm"
        sc.save_as(path, enforce_file_format=True)
        full = pydicom.dcmread(path).pixel_array
        # The legend lies on a band below the source pixels, which keep their grid.
        px = full[:int(sources[z].Rows)]
        red = np.all(px == FINDING_RGB, axis=-1)
        mask = np.zeros(red.shape, bool)
        for les in result.lesions:
            mask |= les.mask[z]
        edge = mask & ~ndimage.binary_erosion(mask)
        assert red[edge].all()
        assert not red[mask & ~edge].any()  # inside stays image
        # The legend (the band below the image) has text pixels in it.
        legend = full[int(sources[z].Rows):, :250].astype(int)
        yellow = (legend[..., 0] > 200) & (legend[..., 1] > 200) & (legend[..., 2] < 60)
        assert yellow.sum() > 100


def test_sources_must_match_the_masks(sources: list[pydicom.Dataset]) -> None:
    result = make_result(sources)
    with pytest.raises(InputError, match="do not match"):
        write_results(result.to_result(), list(reversed(sources)), {"SEG"})
    with pytest.raises(InputError, match="unknown result kinds"):
        write_results(result.to_result(), sources, {"PDF"})


def test_segment_label_names_location_and_confidence(
        written: tuple[PancreasReport, list[WrittenObject]]) -> None:
    _, objs = written
    (seg,) = by_kind(objs, "SEG")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[0] == "Pancreas"
    assert re.fullmatch(r"Lesion 1 \(head\) conf 0\.92", labels[1])

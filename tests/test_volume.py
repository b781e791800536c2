"""Series to volume on the real scanner data, checked against an independent reader.

The reference is SimpleITK's ImageSeriesReader with GDCM's ordering: a reader
we did not write, built on different code (GDCM + ITK) from ours (pydicom +
numpy). Refusals are tested on deliberately broken copies written to tmp dirs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.uid import generate_uid

from pipelines.volume import Volume, load_datasets, load_series
from storage.errors import GeometryError, InputError
from tests.support.data import dicom_series_dir

# Every series that is one 3D volume (the 4D EPI is refused by design, tested below).
VOLUME_SERIES = [
    "ct_abdomen_siemens",
    "ct_phantom_philips",
    "mr_head_ge_3dt1",
    "mr_head_siemens_t1sag",
    "mr_head_philips_classic",
]


def _files(name: str) -> list[Path]:
    return sorted(p for p in dicom_series_dir(name).iterdir() if p.is_file())


def _sitk_reference(name: str) -> tuple[sitk.Image, list[str]]:
    reader = sitk.ImageSeriesReader()
    folder = str(dicom_series_dir(name))
    ids = reader.GetGDCMSeriesIDs(folder)
    assert len(ids) == 1, f"SimpleITK sees {len(ids)} series in {name}"
    names = reader.GetGDCMSeriesFileNames(folder, ids[0])
    reader.SetFileNames(names)
    return reader.Execute(), list(names)


def _meta_sop_uid(path: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)


@pytest.mark.parametrize("name", VOLUME_SERIES)
def test_geometry_matches_simpleitk_gdcm(name: str) -> None:
    volume = load_series(_files(name))
    ref, ref_files = _sitk_reference(name)

    assert volume.shape == tuple(reversed(ref.GetSize()))
    np.testing.assert_allclose(volume.origin, ref.GetOrigin(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(volume.spacing, ref.GetSpacing(), rtol=0, atol=1e-3)
    # Direction "exactly": the same arithmetic on the same IOP, so equal to the last
    # bit or one rounding step of a double (2.2e-16 seen on the oblique GE series).
    np.testing.assert_allclose(volume.direction, ref.GetDirection(), rtol=0, atol=1e-15)
    # Same slice order as GDCM's position sort, slice by slice.
    assert volume.sop_instance_uids == [_meta_sop_uid(f) for f in ref_files]
    # Same modality values (GDCM applies the rescale too); float32 rounding only.
    ref_array = sitk.GetArrayFromImage(ref).astype(np.float64)
    np.testing.assert_allclose(volume.array, ref_array, rtol=1e-6, atol=1e-4)
    assert volume.array.dtype == np.float32


def test_ct_is_sorted_by_position_not_instance_number_and_in_hu() -> None:
    files = _files("ct_abdomen_siemens")
    volume = load_series(files)
    headers = load_datasets(files)
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    numbers = [int(h.InstanceNumber) for h in headers]
    assert z == sorted(z) and len(set(z)) == len(z)
    assert numbers == sorted(numbers, reverse=True)  # InstanceNumber falls as z rises
    assert volume.origin[2] == pytest.approx(min(z))
    assert volume.spacing[2] == pytest.approx(2.0)
    # HU: raw stored value plus intercept -1024, checked on one slice decoded independently.
    ds = pydicom.dcmread(files[7])
    k = volume.sop_instance_uids.index(str(ds.file_meta.MediaStorageSOPInstanceUID))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_array_equal(volume.array[k], expected)
    assert volume.array.min() >= -1024.0
    assert volume.modality == "CT"


def test_empty_sop_uids_fall_back_to_file_meta() -> None:
    files = _files("ct_abdomen_siemens")
    assert pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID == ""
    volume = load_series(files)
    expected = {f.name.removeprefix("CT.").removesuffix(".dcm") for f in files}
    assert set(volume.sop_instance_uids) == expected
    assert volume.series_instance_uid == ""  # empty in the data; not invented here
    assert volume.frame_of_reference_uid


def test_enhanced_multiframe_equals_classic_series() -> None:
    enhanced = load_series(_files("mr_head_philips_enhanced"))
    classic = load_series(_files("mr_head_philips_classic"))
    assert enhanced.shape == classic.shape == (40, 96, 96)
    np.testing.assert_array_equal(enhanced.array, classic.array)
    np.testing.assert_allclose(enhanced.origin, classic.origin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enhanced.spacing, classic.spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enhanced.direction, classic.direction, rtol=0, atol=1e-12)
    assert enhanced.series_instance_uid == classic.series_instance_uid
    # One source object, 40 frames, each slice naming its frame.
    assert len(set(enhanced.sop_instance_uids)) == 1
    assert enhanced.frame_numbers is not None and sorted(enhanced.frame_numbers) == list(
        range(1, 41)
    )
    assert classic.frame_numbers is None
    # Philips: the standard rescale (slope 0.1) is applied, not the private scale slope.
    raw = pydicom.dcmread(_files("mr_head_philips_classic")[0])
    k = classic.sop_instance_uids.index(str(raw.SOPInstanceUID))
    np.testing.assert_allclose(classic.array[k], raw.pixel_array * 0.1, rtol=1e-6)


def test_frame_numbers_follow_positions() -> None:
    path = _files("mr_head_philips_enhanced")[0]
    volume = load_series([path])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert volume.frame_numbers is not None
    normal = np.asarray(volume.direction).reshape(3, 3)[:, 2]
    along = []
    for f in volume.frame_numbers:
        item = ds.PerFrameFunctionalGroupsSequence[f - 1]
        ipp = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        along.append(float(ipp @ normal))
    assert along == sorted(along)


def test_to_sitk_and_back() -> None:
    volume = load_series(_files("mr_head_siemens_t1sag"))
    image = volume.to_sitk()
    again = Volume.from_sitk(image, like=volume)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.sop_instance_uids == volume.sop_instance_uids
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(v + 1.0 for v in image.GetOrigin()))
    with pytest.raises(GeometryError, match="origin"):
        Volume.from_sitk(shifted, like=volume)


# --- refusals on broken copies ---------------------------------------------------------


def _copy(name: str, tmp_path: Path) -> list[Path]:
    out = tmp_path / name
    out.mkdir()
    for f in _files(name):
        shutil.copy(f, out / f.name)
    return sorted(out.iterdir())


def _by_position(paths: list[Path]) -> list[Path]:
    """Files in slice order, from the headers (the test's own sort, on one axis)."""

    def key(p: Path) -> float:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        return float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal)

    return sorted(paths, key=key)


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_refuses_mixed_orientations(tmp_path: Path) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    _edit(files[10], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])  # one axial slice
    with pytest.raises(GeometryError, match="mixed orientations"):
        load_series(files)


def test_refuses_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    _edit(files[3], PixelSpacing=[1.2, 1.2])
    with pytest.raises(GeometryError, match="inconsistent pixel spacing"):
        load_series(files)


def test_refuses_inconsistent_rows_columns(tmp_path: Path) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    ds = pydicom.dcmread(files[5])
    smaller = np.ascontiguousarray(ds.pixel_array[:200, :])
    ds.Rows = 200
    ds.PixelData = smaller.tobytes()
    ds.save_as(files[5])
    with pytest.raises(GeometryError, match="inconsistent rows/columns"):
        load_series(files)


def test_refuses_duplicate_positions(tmp_path: Path) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    ds = pydicom.dcmread(files[8])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    extra = tmp_path / "mr_head_siemens_t1sag" / "repeat.dcm"
    ds.save_as(extra)
    with pytest.raises(GeometryError, match="duplicate slice positions") as err:
        load_series([*files, extra])
    # Both images at the shared position are named, so an admin can find them in PACS.
    original = pydicom.dcmread(files[8], stop_before_pixels=True)
    assert str(original.SOPInstanceUID) in str(err.value)
    assert str(ds.SOPInstanceUID) in str(err.value)
    assert f"#{original.InstanceNumber} " in str(err.value)
    assert "multi-phase" not in str(err.value)  # one repeat is not a 4D series


def test_names_both_causes_of_a_tilted_stack_with_mixed_spacing(tmp_path: Path) -> None:
    files = _by_position(_copy("ct_phantom_philips", tmp_path))
    tilt = np.radians(18.5)
    half = len(files) // 2
    z0 = float(pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient[2])
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        # 4 mm steps for the first half, 7 mm after: two reconstructions as one series.
        along = 4.0 * k if k <= half else 4.0 * half + 7.0 * (k - half)
        ds.ImagePositionPatient = [x, round(y + along * np.tan(tilt), 4), z0 + along]
        ds.save_as(path)
    with pytest.raises(GeometryError) as err:
        load_series(files)
    text = str(err.value)
    assert "mixed slice spacing: 4.000 mm" in text and "7.000 mm" in text
    assert "gantry tilt / sheared stack" in text and "18.50 degrees" in text
    assert "missing slices" not in text


def test_refuses_4d_series_as_duplicate_positions() -> None:
    with pytest.raises(GeometryError, match="duplicate slice positions: 150 images at only 15"):
        load_series(_files("mr_head_ge_epi4d"))


@pytest.mark.parametrize("removed", [1, 2])
def test_refuses_missing_slices(tmp_path: Path, removed: int) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    kept = files[:15] + files[15 + removed :]
    with pytest.raises(GeometryError, match=r"missing slices: a gap of .* 1\.5x the median"):
        load_series(kept)
    # The same files minus nothing load fine: the refusal is about the gap alone.
    assert load_series(files).shape[0] == len(files)


def test_refuses_fewer_slices_than_the_pipeline_minimum() -> None:
    files = _files("mr_head_siemens_t1sag")
    with pytest.raises(GeometryError, match="too few slices: 35, the pipeline needs at least 40"):
        load_series(files, min_slices=40)
    assert load_series(files, min_slices=35).shape[0] == 35


@pytest.mark.parametrize("image_type", [["ORIGINAL", "PRIMARY", "LOCALIZER"], "LOCALIZER"])
def test_refuses_localizer_mixed_in(tmp_path: Path, image_type: object) -> None:
    files = _by_position(_copy("ct_phantom_philips", tmp_path))
    # A scout: localizer image type, coronal, somewhere in the middle of the folder.
    _edit(
        files[12],
        ImageType=image_type,
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )
    with pytest.raises(GeometryError, match="localizer/scout images mixed in: 1 of 28"):
        load_series(files)


def test_refuses_gantry_tilt_instead_of_shearing(tmp_path: Path) -> None:
    files = _by_position(_copy("ct_phantom_philips", tmp_path))
    tilt = np.radians(15.0)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        # A tilted gantry: each slice moves along y as well as z, IOP stays axial.
        ds.ImagePositionPatient = [x, round(y + k * 5.0 * np.tan(tilt), 4), z]
        ds.GantryDetectorTilt = 15
        ds.save_as(path)
    with pytest.raises(GeometryError, match="gantry tilt / sheared stack") as err:
        load_series(files)
    assert "15.00 degrees" in str(err.value)


def test_refuses_instances_of_two_series(tmp_path: Path) -> None:
    files = _by_position(_copy("mr_head_siemens_t1sag", tmp_path))
    _edit(files[0], SeriesInstanceUID=generate_uid())
    with pytest.raises(GeometryError, match="2 different series"):
        load_series(files)


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match=r"junk\.dcm"):
        load_series([bad])


def test_empty_series_is_refused() -> None:
    with pytest.raises(GeometryError, match="empty"):
        load_series([])

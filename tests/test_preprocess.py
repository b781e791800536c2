"""Preprocessing steps, presets, provenance and the inverse, on real scanner series.

The round-trip tests draw masks on the source grid (a real TotalSegmentator
pancreas label mapped through its affine, and ellipsoids of several sizes),
push them through the forward geometry and back through the inverse, and
require them to land on the same voxels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk  # noqa: N813
from pydantic import ValidationError

from pipelines.preprocess import (
    INTENSITY_PRESETS,
    PRESETS,
    AdaptiveHistogramEqualisation,
    Context,
    Intensity,
    ModelInput,
    N4BiasCorrection,
    PreprocessConfig,
    Preprocessor,
    Reorient,
    ResampleToSpacing,
    Resize2D,
    RoiBox,
    Window,
    ZScore,
    build,
    crop_to_roi,
    ct_abdomen,
    ct_pancreas,
    ct_pancreas_window,
    for_modality,
    mr_t1,
    mr_t1_zscore,
)
from pipelines.volume import Volume, load_series
from storage.errors import ConfigError, GeometryError, ModelError, PipelineError
from tests.support.data import SHARED_DATA, dicom_series_dir

PANCREAS_LABEL = 7  # TotalSegmentator v2 "total" map


@cache
def _volume(name: str) -> Volume:
    return load_series(sorted(p for p in dicom_series_dir(name).iterdir() if p.is_file()))


def _dice(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a, b = a > 0, b > 0
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def _ellipsoids(volume: Volume, seed: int) -> list[npt.NDArray[np.bool_]]:
    """Objects of about 11 to 4000 voxels, placed at random inside the volume."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(volume.shape, sparse=True)
    out = []
    for radius in (1.5, 2.5, 4.0, 10.0):
        while True:  # the smallest object: grow until it is just over 10 voxels
            rz = max(radius * 0.5, 1.2)
            c = [
                rng.uniform(r + 1, n - r - 2)
                for r, n in zip((rz, radius, radius), volume.shape, strict=True)
            ]
            d2 = ((z - c[0]) / rz) ** 2 + ((y - c[1]) / radius) ** 2 + ((x - c[2]) / radius) ** 2
            if np.count_nonzero(d2 <= 1.0) > 10:
                break
            radius += 0.1
        out.append(d2 <= 1.0)
    return out


def _pancreas_on_ct(volume: Volume) -> npt.NDArray[np.bool_]:
    """TotalSegmentator's pancreas on ct_abdomen_siemens, mapped by its affine, not by index."""
    path = SHARED_DATA / "nifti" / "totalsegmentator_example" / "example_seg_dicom.nii.gz"
    seg = sitk.ReadImage(str(path))
    on_grid = sitk.Resample(seg, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(on_grid) == PANCREAS_LABEL


def _round_trip(mask: npt.NDArray[Any], provenance: dict[str, Any]) -> npt.NDArray[np.uint8]:
    forward = Preprocessor.forward_label(mask.astype(np.uint8), provenance)
    # What a model would hand back: a plain array on the preprocessed grid.
    prediction = sitk.GetArrayFromImage(forward)
    return Preprocessor.invert_label(prediction, json.loads(json.dumps(provenance)))


# --- round trip (acceptance) -----------------------------------------------------------


def test_round_trip_axial_ct_real_pancreas_label() -> None:
    volume = _volume("ct_abdomen_siemens")
    pancreas = _pancreas_on_ct(volume)
    assert np.count_nonzero(pancreas) == 1327  # the README's count: the mapping is right
    image, provenance = ct_pancreas().forward(volume)
    assert image.GetSize() != volume.to_sitk().GetSize()  # it really was resampled
    back = _round_trip(pancreas, provenance)
    assert back.shape == volume.shape
    assert _dice(pancreas, back) >= 0.99


@pytest.mark.parametrize(
    ("series", "factory"),
    [
        ("ct_abdomen_siemens", ct_pancreas),
        ("mr_head_ge_3dt1", mr_t1),  # oblique (13 degrees)
        ("mr_head_siemens_t1sag", mr_t1),  # sagittal: reorientation permutes the axes
        ("mr_head_philips_enhanced", mr_t1),  # multi-frame, slightly oblique
    ],
)
def test_round_trip_objects_land_on_the_same_voxels(series: str, factory: Any) -> None:
    volume = _volume(series)
    image, provenance = factory().forward(volume)
    assert image.GetSize() != volume.to_sitk().GetSize()  # the grid really changed
    for mask in _ellipsoids(volume, seed=len(series)):
        assert np.count_nonzero(mask) > 10
        back = _round_trip(mask, provenance)
        assert _dice(mask, back) >= 0.99, f"{series}: {np.count_nonzero(mask)} voxels"


def test_round_trip_through_crop_and_2d_resize_is_exact_inside_the_roi() -> None:
    volume = _volume("ct_abdomen_siemens")
    pancreas = _pancreas_on_ct(volume)
    roi = RoiBox.from_volume_mask(volume, pancreas)
    assert roi is not None
    # Upsampling 2D resize: the crop is about 190 x 110 voxels at 0.8 mm.
    pre = ct_pancreas(crop_margin_mm=20.0, resize=(320, 320))
    image, provenance = pre.forward(volume, roi=roi)
    assert image.GetSize()[:2] == (320, 320)
    crop = next(s for s in provenance["steps"] if s["step"] == "crop")
    assert crop["roi_source"] == "context" and "crop_index_start" in crop
    assert _dice(pancreas, _round_trip(pancreas, provenance)) >= 0.99


def test_coarser_grid_loses_only_boundary_voxels_and_probabilities_do_better() -> None:
    volume = _volume("ct_abdomen_siemens")
    pancreas = _pancreas_on_ct(volume)
    image, provenance = ct_pancreas(target_spacing=(1.6, 1.6, 2.0)).forward(volume)
    coarse = sitk.GetArrayFromImage(Preprocessor.forward_label(pancreas, provenance))
    nearest = Preprocessor.invert_label(coarse, provenance)
    # A model's soft output on the coarse grid: linear forward of the mask.
    soft = sitk.Resample(
        sitk.Cast(_as_image(pancreas, volume), sitk.sitkFloat32),
        image,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
    )
    linear = Preprocessor.invert_probability(sitk.GetArrayFromImage(soft), provenance) >= 0.5
    d_nearest, d_linear = _dice(pancreas, nearest), _dice(pancreas, linear)
    assert 0.8 < d_nearest < 0.99  # a real loss on a 2x coarser grid, not a bug
    assert d_linear > d_nearest


def _as_image(mask: npt.NDArray[Any], volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def test_inverse_slices_are_the_source_slices() -> None:
    """A mark on one source slice comes back on that slice (what SEG frames rely on)."""
    volume = _volume("mr_head_siemens_t1sag")
    _, provenance = mr_t1().forward(volume)
    mark = np.zeros(volume.shape, dtype=np.uint8)
    mark[17, 100:140, 90:130] = 1
    back = _round_trip(mark, provenance)
    assert np.nonzero(back.any(axis=(1, 2)))[0].tolist() == [17]


def test_invert_label_checks_the_shape() -> None:
    volume = _volume("ct_abdomen_siemens")
    _, provenance = ct_pancreas().forward(volume)
    with pytest.raises(GeometryError, match="preprocessed grid"):
        Preprocessor.invert_label(np.zeros(volume.shape, dtype=np.uint8), provenance)


# --- steps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "level", "width"), [(ct_pancreas_window, 50, 150), (ct_abdomen, 40, 350)]
)
def test_ct_window_presets(factory: Any, level: float, width: float) -> None:
    volume = _volume("ct_abdomen_siemens")
    image, provenance = factory(target_spacing=None).forward(volume)
    out = sitk.GetArrayFromImage(image)
    expected = np.clip((volume.array - (level - width / 2)) / width, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    window = next(s for s in provenance["steps"] if s["step"] == "window")
    assert window["window"] == {
        "level": level,
        "width": width,
        "low": level - width / 2,
        "high": level + width / 2,
    }


def test_ct_pancreas_is_the_shipped_models_maths() -> None:
    """``ct_pancreas`` means (HU + 200) / 550 clipped to 0..1 (-200..350 HU), the
    maths the shipped CT weights were trained with; L50/W150 is ``ct_pancreas_window``."""
    volume = _volume("ct_abdomen_siemens")
    image, provenance = ct_pancreas(target_spacing=None).forward(volume)
    expected = np.clip((volume.array.astype(np.float32) + 200.0) / 550.0, 0.0, 1.0)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    assert [s["step"] for s in provenance["steps"]] == ["reorient", "intensity"]
    assert provenance["steps"][1]["clip_hu"] == [-200.0, 350.0]


def test_mr_t1_is_the_shipped_models_maths() -> None:
    """``mr_t1`` means division by the foreground's 99.5th percentile, clipped to
    0..1.5; the foreground z-score is ``mr_t1_zscore``."""
    volume = _volume("mr_head_ge_3dt1")
    image, provenance = mr_t1(target_spacing=None).forward(volume)
    reoriented = sitk.GetArrayFromImage(
        Reorient("LPS").forward(volume.to_sitk(), Context(modality="MR"))
    ).astype(np.float32)
    hi = float(np.percentile(reoriented[reoriented > 0], 99.5))
    expected = np.clip(reoriented / hi, 0.0, 1.5)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    assert provenance["steps"][-1]["percentile_99_5"] == pytest.approx(hi, rel=1e-6)
    zscored, _ = mr_t1_zscore(target_spacing=None).forward(volume)
    assert not np.allclose(sitk.GetArrayFromImage(zscored), expected)


def test_same_preset_name_same_maths_everywhere() -> None:
    """A declared preset that shares its name with an intensity preset applies exactly
    that preset, and a model contract of that name gets the same step."""
    shared = set(PRESETS) & set(INTENSITY_PRESETS)
    assert shared == {"ct_pancreas", "mr_t1"}
    for name in shared:
        steps = PRESETS[name](target_spacing=None).describe()
        assert {"step": "intensity", "preset": name, "window": None} in steps
        assert [s.params() for s in ModelInput(name, (3.0, 3.0, 3.0)).steps()][1] == {
            "preset": name,
            "window": None,
        }
    for other in ("ct_pancreas_window", "ct_abdomen", "mr_t1_zscore"):
        assert all(s["step"] != "intensity" for s in PRESETS[other]().describe())


def test_unknown_or_incomplete_intensity_presets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown intensity preset 'ct'"):
        Intensity("ct")  # exact names only: no prefix ever means ct_pancreas
    with pytest.raises(ValueError, match="needs a window"):
        Intensity("ct_range")
    with pytest.raises(ModelError, match="unknown intensity preset 'ct_soft'"):
        ModelInput("ct_soft", (1.0, 1.0, 1.0)).forward(_volume("ct_phantom_philips").to_sitk())


def test_model_input_records_its_forward_and_inverts_it() -> None:
    """The contract path: whole scan at the model spacing, then back to the source."""
    volume = _volume("ct_abdomen_siemens")
    pancreas = _pancreas_on_ct(volume)
    prepared = ModelInput("ct_pancreas", (0.8, 0.8, 2.0)).forward(volume.to_sitk())
    provenance = json.loads(json.dumps(prepared.provenance))
    assert [s["step"] for s in provenance["steps"]] == ["resample", "intensity"]
    assert provenance["steps"][0]["default_value"] == -1000.0
    assert provenance["output_grid"]["spacing"] == [0.8, 0.8, 2.0]
    on_model_grid = prepared.label(_as_image(pancreas, volume))
    assert on_model_grid.shape == prepared.array().shape
    back = prepared.invert_label(on_model_grid)
    assert back.shape == volume.shape and _dice(pancreas, back) >= 0.99
    soft = prepared.invert_probability(on_model_grid.astype(np.float32))
    assert _dice(pancreas, soft >= 0.5) >= 0.99
    # onto a given grid (what stage 2 gets): the recorded output grid is that grid
    roi = Preprocessor.forward_label(pancreas.astype(np.uint8), prepared.provenance)
    onto = ModelInput("ct_pancreas", (0.8, 0.8, 2.0)).forward(volume.to_sitk(), onto=roi)
    assert onto.provenance["output_grid"] == prepared.provenance["output_grid"]
    assert np.array_equal(onto.array(), prepared.array())


def test_reorient_is_a_lossless_permutation() -> None:
    volume = _volume("mr_head_siemens_t1sag")
    ctx = Context(modality="MR")
    out = Reorient("LPS").forward(volume.to_sitk(), ctx)
    np.testing.assert_allclose(np.asarray(out.GetDirection()), np.eye(3).ravel(), atol=1e-12)
    assert ctx.record["orientation_before"] != "LPS"
    array = sitk.GetArrayFromImage(out)
    assert sorted(array.shape) == sorted(volume.shape)
    np.testing.assert_array_equal(np.sort(array, axis=None), np.sort(volume.array, axis=None))
    # Every voxel keeps its physical position: check one voxel through both grids.
    src = volume.to_sitk()
    idx = (100, 60, 20)
    point = src.TransformIndexToPhysicalPoint(idx)
    assert out[out.TransformPhysicalPointToIndex(point)] == src[idx]


def test_resample_keeps_the_physical_extent() -> None:
    volume = _volume("mr_head_ge_3dt1")
    src = volume.to_sitk()
    out = ResampleToSpacing((1.5, 1.5, 1.5)).forward(src, Context(modality="MR"))
    assert out.GetSpacing() == (1.5, 1.5, 1.5)

    def centre(img: sitk.Image) -> np.ndarray:
        return np.asarray(
            img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
        )

    np.testing.assert_allclose(centre(out), centre(src), atol=0.75)  # within half a new voxel


def test_zscore_over_the_foreground() -> None:
    volume = _volume("mr_head_ge_3dt1")
    ctx = Context(modality="MR")
    out = sitk.GetArrayFromImage(ZScore(nonzero=True).forward(volume.to_sitk(), ctx))
    fg = volume.array > 0
    assert abs(float(out[fg].mean())) < 1e-3 and abs(float(out[fg].std()) - 1.0) < 1e-3
    assert np.all(out[~fg] == 0)
    assert ctx.record["mean"] == pytest.approx(float(volume.array[fg].mean()), rel=1e-4)


def test_n4_removes_a_known_bias_field() -> None:
    """A two-tissue phantom times a smooth exponential field: N4 must take the field out.

    A phantom, not the real GE T1, because the truth must be known: N4 also
    corrects the scan's own inhomogeneity, so on real data there is nothing exact
    to compare with (and a synthetic linear ramp on that head was not recovered
    by N4 with default settings; see the README section).
    """
    n = 96
    z, y, x = np.indices((n, n, n)).astype(np.float32)
    c = (n - 1) / 2
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2)
    rng = np.random.default_rng(0)
    truth = np.where(r < 40, 100.0, 0.0) + np.where(r < 20, 100.0, 0.0)
    truth = (truth + rng.normal(0, 3, truth.shape) * (r < 40)).astype(np.float32)
    field = np.exp(0.4 * (x - c) / n).astype(np.float32)
    ctx = Context(modality="MR")
    out = sitk.GetArrayFromImage(
        N4BiasCorrection(shrink=2).forward(sitk.GetImageFromArray(truth * field), ctx)
    )
    fg = r < 38

    def slope(arr: npt.NDArray[Any]) -> float:
        ratio = np.log(np.maximum(arr[fg], 1e-3) / truth[fg])
        return float(np.polyfit(x[fg], ratio, 1)[0])

    assert abs(slope(out)) < 0.1 * abs(slope(truth * field))
    assert ctx.record["shrink_factors"] == [2, 2, 2]


def test_clahe_changes_contrast_not_grid() -> None:
    volume = _volume("ct_phantom_philips")
    src = Window(40, 350).forward(volume.to_sitk(), Context(modality="CT"))
    out = AdaptiveHistogramEqualisation().forward(src, Context(modality="CT"))
    a, b = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(src)
    assert a.shape == b.shape and a.min() >= -1e-6 and a.max() <= 1 + 1e-6
    assert float(np.abs(a - b).mean()) > 0.01


def test_resize2d_for_2d_models() -> None:
    volume = _volume("ct_phantom_philips")
    ctx = Context(modality="CT")
    out = Resize2D(256, 256).forward(volume.to_sitk(), ctx)
    assert out.GetSize() == (256, 256, volume.shape[0])
    assert out.GetSpacing()[0] == pytest.approx(volume.spacing[0] * 2)


def test_crop_without_roi_is_skipped_and_recorded() -> None:
    volume = _volume("ct_phantom_philips")
    ctx = Context(modality="CT")
    src = volume.to_sitk()
    out = crop_to_roi(None, 10.0).forward(src, ctx)
    assert out.GetSize() == src.GetSize() and ctx.record["skipped"] == "no region of interest"


def test_crop_to_foreground_with_margin() -> None:
    volume = _volume("ct_phantom_philips")
    ctx = Context(modality="CT")
    src = volume.to_sitk()
    out = crop_to_roi(None, 5.0, foreground_threshold=-500.0).forward(src, ctx)
    start, stop = ctx.record["crop_index_start"], ctx.record["crop_index_stop"]
    # Independent: the bounding box of the thresholded array, grown by 5 mm in-plane.
    _, _, xx = np.nonzero(volume.array >= -500.0)
    margin = int(np.ceil(5.0 / volume.spacing[0]))
    assert start[0] == max(0, int(xx.min()) - margin)
    assert stop[0] == min(volume.shape[2], int(xx.max()) + margin + 1)
    assert out.GetSize()[0] == stop[0] - start[0] < src.GetSize()[0]


def test_intensity_step_may_not_change_the_grid() -> None:
    @dataclass(frozen=True)
    class Sneaky:
        name: str = "sneaky"
        geometric: bool = False

        def params(self) -> dict[str, Any]:
            return {}

        def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
            return image[:, :, 1:]

    with pytest.raises(PipelineError, match="sneaky changed the grid"):
        Preprocessor([Sneaky()]).forward(_volume("ct_phantom_philips"))


def test_failing_step_is_named() -> None:
    with pytest.raises(PipelineError, match="preprocess: window width must be positive"):
        Preprocessor([Window(40, 0)]).forward(_volume("ct_phantom_philips"))


# --- provenance and configuration ------------------------------------------------------


def test_provenance_records_every_step_and_is_json() -> None:
    volume = _volume("ct_abdomen_siemens")
    roi = RoiBox.from_volume_mask(volume, _pancreas_on_ct(volume))
    _, provenance = ct_pancreas_window(crop_margin_mm=15.0).forward(volume, roi=roi)
    text = json.dumps(provenance)
    again = json.loads(text)
    assert [s["step"] for s in again["steps"]] == ["reorient", "resample", "crop", "window"]
    resample = again["steps"][1]
    assert resample["spacing_before"] == pytest.approx([0.976562, 0.976562, 2.0])
    assert resample["spacing_after"] == [0.8, 0.8, 2.0]
    assert again["steps"][2]["crop_index_stop"] and again["steps"][3]["window"]["level"] == 50
    assert again["source_grid"]["size"] == [512, 512, 20]
    assert again["series_instance_uid"] == volume.series_instance_uid


def test_config_builds_presets_and_refuses_nonsense() -> None:
    pre = build(PreprocessConfig(preset="ct_abdomen", target_spacing=(1.0, 1.0, None)))
    assert [s["step"] for s in pre.describe()] == ["reorient", "resample", "window"]
    assert pre.describe()[2]["level"] == 40
    mr = build(PreprocessConfig(preset="mr_t1_zscore", n4=True, resize=(256, 256)))
    assert [s["step"] for s in mr.describe()] == [
        "reorient",
        "n4",
        "resample",
        "zscore",
        "resize2d",
    ]
    with pytest.raises(ValidationError, match="windw"):
        PreprocessConfig.model_validate({"preset": "ct_pancreas", "windw": [1, 2]})
    with pytest.raises(ConfigError, match="not to ct_pancreas"):
        build(PreprocessConfig(preset="ct_pancreas", window=(50, 150)))
    pancreas = build(PreprocessConfig(preset="ct_pancreas_window", window=(60, 200)))
    assert pancreas.describe()[2]["level"] == 60
    mr = build(PreprocessConfig(preset="mr_t1", n4=True))
    assert [s["step"] for s in mr.describe()] == ["reorient", "n4", "resample", "intensity"]
    with pytest.raises(ConfigError, match="window applies to CT"):
        build(PreprocessConfig(preset="mr_t1", window=(40, 400)))
    with pytest.raises(ConfigError, match="is for CT, the series is MR"):
        for_modality("MR", PreprocessConfig(preset="ct_pancreas"))
    assert for_modality("CT").name == "ct_pancreas" and for_modality("MR").name == "mr_t1"
    with pytest.raises(ConfigError, match="no preprocessing preset"):
        for_modality("US")


def test_pixels_is_the_resampled_image_itself_and_keeps_it_alive() -> None:
    """``pixels``: GetArrayFromImage's values without its copy; writable; the image
    lives as long as the array (the pipeline keeps source-grid maps this way)."""
    import gc

    from pipelines.preprocess import pixels, resample_like

    rng = np.random.default_rng(3)
    src = sitk.GetImageFromArray(rng.random((7, 9, 11)).astype(np.float32))
    src.SetSpacing((0.7, 0.9, 2.0))
    ref = sitk.Image([23, 19, 13], sitk.sitkUInt8)
    ref.SetSpacing((0.4, 0.5, 1.1))
    for label in (False, True):
        img = sitk.Cast(src > 0.5, sitk.sitkUInt8) if label else src
        want = sitk.GetArrayFromImage(resample_like(img, ref, label=label))
        got = pixels(resample_like(img, ref, label=label))
        gc.collect()  # the image is referenced by the array alone now
        assert got.dtype == want.dtype and got.shape == want.shape == (13, 19, 23)
        assert np.array_equal(got, want) and got.flags.writeable
        if label:  # a 0/1 label seen as bool is the same array as astype(bool)
            assert np.array_equal(got.view(np.bool_), want.astype(bool))
        got[0, 0, 0] = 1
        assert got[0, 0, 0] == 1

"""The pancreas pipeline's applicability step: series, anatomy and competence checks, and
lesions only where the pancreas is.

Real inputs (the shared head CT phantom, brain MRs, the Siemens abdomen) and
synthetic ones (bodies drawn here, so each rule is tested on a case it must
refuse and on one it must keep).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from pipelines.models.package import load_package, read_manifest, write_manifest
from pipelines.pancreas import build_pipeline
from pipelines.pancreas.applicability import (
    Applicability,
    anatomy_check,
    body_part_verdict,
    coarse_view,
    competence_check,
    mahalanobis,
    series_check,
)
from pipelines.pancreas.candidates import Candidate
from pipelines.pancreas.model import SHIPPED_WEIGHTS, near_pancreas
from pipelines.pancreas.output import PancreasReport
from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk
from pipelines.results import AlgorithmInfo
from pipelines.training.competence import fit_statistics, ledoit_wolf, write_competence
from pipelines.volume import Volume, load_series
from storage.errors import ModelError
from tests.support.data import dicom_series_dir


@pytest.fixture(scope="module")
def ct_pipeline():  # type: ignore[no-untyped-def]
    return build_pipeline("pancreas-ct", device="cpu")


@pytest.fixture(scope="module")
def mr_pipeline():  # type: ignore[no-untyped-def]
    return build_pipeline("pancreas-mr", device="cpu")


def _series(name: str) -> Volume:
    return load_series(sorted(p for p in dicom_series_dir(name).rglob("*") if p.is_file()))


def _image(arr: np.ndarray, spacing: float = 2.0) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    return img


def _body_ct(shape: tuple[int, int, int] = (50, 120, 160), spacing: float = 2.0,
             half_axes_mm: tuple[float, float] = (140.0, 100.0),
             spine: bool = True) -> np.ndarray:
    """A CT "abdomen": soft-tissue ellipse in air, a vertebral body near the back."""
    _z, y, x = shape
    arr = np.full(shape, -1000.0, np.float32)
    yy, xx = np.mgrid[:y, :x]
    cy, cx = y / 2, x / 2
    ax, ay = half_axes_mm[0] / spacing, half_axes_mm[1] / spacing
    body = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    arr[:, body] = 40.0
    if spine:
        sy = cy + ay - 40.0 / spacing  # 4 cm in front of the back
        disc = (xx - cx) ** 2 + (yy - sy) ** 2 <= (15.0 / spacing) ** 2
        arr[:, disc] = 600.0
    return arr


# --- the volume carries what the header says -------------------------------------------


def test_the_volume_carries_body_part_and_image_type() -> None:
    head = _series("ct_phantom_philips")
    assert head.body_part == "BRAIN" and head.image_type[:2] == ("ORIGINAL", "PRIMARY")
    abdomen = _series("ct_abdomen_siemens")
    assert abdomen.body_part == "PARTIALBODY"
    # from_sitk keeps them (a filtered copy is the same series)
    again = Volume.from_sitk(head.to_sitk(), head)
    assert (again.body_part, again.image_type) == (head.body_part, head.image_type)


@pytest.mark.parametrize(("value", "verdict"), [
    ("BRAIN", False), ("HEAD", False), ("HEADNECK", False), ("EXTREMITY", False),
    ("CHEST", False), ("ABDOMEN", True), ("PANCREAS", True), ("CHEST_ABDOMEN", True),
    ("CHESTABDPELVIS", True), ("Abdomen", True), ("", None), ("XYZ", None),
])
def test_body_part_words(value: str, verdict: bool | None) -> None:
    assert body_part_verdict(value) is verdict


# --- 1. the series check ---------------------------------------------------------------


def test_series_check_passes_an_abdomen_and_names_each_failure() -> None:
    view = coarse_view(_image(_body_ct()), "CT")
    ok = series_check(view, expected_modality="CT", modality="CT", body_part="ABDOMEN")
    assert ok.passed, ok.failed
    assert ok.values["body_width_mm"] == pytest.approx(280, abs=8)
    bad = series_check(view, expected_modality="CT", modality="MR", body_part="BRAIN",
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert bad.passed is False
    text = bad.reason
    assert text.startswith("series check:")
    assert "modality MR" in text and "BRAIN" in text and "localizer" in text


def test_series_check_refuses_a_head_sized_body_without_any_header_help() -> None:
    # A 15 cm wide "head", no body part: the outline alone refuses it.
    head = coarse_view(_image(_body_ct(half_axes_mm=(75.0, 90.0), spine=False)), "CT")
    check = series_check(head, expected_modality="CT", modality="CT")
    assert check.passed is False and "narrower than an adult abdomen" in check.reason


def test_series_check_refuses_a_thin_slab() -> None:
    slab = coarse_view(_image(_body_ct(shape=(5, 120, 160))), "CT")  # 10 mm
    check = series_check(slab, expected_modality="CT", modality="CT")
    assert check.passed is False and "field of view" in check.reason


def test_head_ct_phantom_is_not_assessable(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    vol = _series("ct_phantom_philips")
    res = ct_pipeline.run(vol)
    assert res.status == "not_assessable"
    assert res.reason is not None and res.reason.startswith("series check:")
    assert "BRAIN" in res.reason
    assert res.segments == [] and res.findings == []
    assert res.summary().startswith("Not assessable: series check")
    assert res.provenance["applicability_failed"] == "series"
    # with the body part left empty (as a hospital may), the body outline still refuses
    blank = dataclasses.replace(vol, body_part="")
    res2 = ct_pipeline.run(blank)
    assert res2.status == "not_assessable" and res2.reason is not None
    assert res2.reason.startswith("series check:") and "wide" in res2.reason
    assert not [f for f in res2.findings if f.kind == "lesion"]


@pytest.mark.parametrize("name", ["mr_head_siemens_t1sag", "mr_head_philips_classic"])
def test_brain_mr_is_not_assessable_on_either_pipeline(name: str, ct_pipeline,  # type: ignore[no-untyped-def]
                                                       mr_pipeline) -> None:
    vol = _series(name)
    for pipe, words in ((mr_pipeline, "BRAIN"), (ct_pipeline, "modality MR")):
        res = pipe.run(vol)
        assert res.status == "not_assessable", res.summary()
        assert res.reason is not None and res.reason.startswith("series check:")
        assert words in res.reason
        assert res.segments == [] and not res.findings


def test_brain_mr_with_no_body_part_never_gives_a_lesion(mr_pipeline) -> None:  # type: ignore[no-untyped-def]
    for name in ("mr_head_siemens_t1sag", "mr_head_philips_classic"):
        vol = dataclasses.replace(_series(name), body_part="", anatomic_region="")
        res = mr_pipeline.run(vol)
        assert res.status == "not_assessable", (name, res.summary())
        assert not [f for f in res.findings if f.kind == "lesion"]


# --- 2. the anatomy check --------------------------------------------------------------


def _gland(shape: tuple[int, int, int], centre: tuple[int, int, int],
           half: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    (cz, cy, cx), (hz, hy, hx) = centre, half
    m[cz - hz:cz + hz, cy - hy:cy + hy, cx - hx:cx + hx] = True
    return m


def test_anatomy_check_keeps_a_plausible_gland_and_refuses_each_implausible_one() -> None:
    arr = _body_ct()
    img = _image(arr)
    view = coarse_view(img, "CT")
    shape = arr.shape
    vox_ml = 8.0 / 1000.0

    def judge(mask: np.ndarray, predicted_ml: float | None = None):  # type: ignore[no-untyped-def]
        ml = float(mask.sum()) * vox_ml
        return anatomy_check(view, mask, img, modality="CT", pancreas_ml=ml,
                             predicted_ml=ml if predicted_ml is None else predicted_ml)

    # 60 x 30 x 24 mm block in the middle of the body, in front of the spine: ~43 ml
    good = _gland(shape, (25, 55, 80), (6, 6, 15))
    ok = judge(good)
    assert ok.passed, ok.failed
    assert ok.values["spine"] == "found" and ok.values["anterior_to_spine_mm"] > 0
    # too small for a 10 cm scan
    assert "ml" in judge(_gland(shape, (25, 55, 80), (1, 2, 2))).reason
    # not one main component: the kept one is a quarter of what stage 1 predicted
    assert "largest component" in judge(good, predicted_ml=4 * good.sum() * vox_ml).reason
    # at the body's edge (just inside the skin, at the front)
    edge = _gland(shape, (25, 13, 80), (6, 3, 15))
    assert "edge" in judge(edge).reason
    # behind the vertebral body
    behind = _gland(shape, (25, 104, 80), (6, 3, 8))
    r = judge(behind)
    assert r.passed is False and ("behind" in r.reason or "edge" in r.reason)
    # on bone
    bony = arr.copy()
    bony[good] = 700.0
    bimg = _image(bony)
    bview = coarse_view(bimg, "CT")
    on_bone = anatomy_check(bview, good, bimg, modality="CT",
                            pancreas_ml=float(good.sum()) * vox_ml,
                            predicted_ml=float(good.sum()) * vox_ml)
    assert on_bone.passed is False and "bone" in on_bone.reason


def test_anatomy_check_relaxes_the_lower_bound_for_a_short_scan() -> None:
    arr = _body_ct(shape=(20, 120, 160))  # 40 mm slab, like the Siemens example
    img = _image(arr)
    view = coarse_view(img, "CT")
    mask = _gland(arr.shape, (10, 55, 80), (4, 6, 12))  # 16 x 24 x 48 mm: ~18 ml
    ml = float(mask.sum()) * 8.0 / 1000.0
    check = anatomy_check(view, mask, img, modality="CT", pancreas_ml=ml, predicted_ml=ml)
    assert check.values["min_ml"] == pytest.approx(8.0, abs=0.5)
    assert check.passed, check.failed


def test_real_abdominal_ct_gives_no_lesion_away_from_the_pancreas(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    res = ct_pipeline.run(_series("ct_abdomen_siemens"))
    app = res.provenance["applicability"]
    assert app["series"]["state"] == "passed"
    if res.assessed:
        for f in res.findings:
            if f.kind == "lesion":
                assert f.details["distance_to_pancreas_mm"] <= 10.0
    else:
        assert res.reason and res.reason.split(" check:")[0] in app
        assert app[res.reason.split(" check:")[0]]["state"] == "failed"
        assert res.segments == [] and res.findings == []


# --- the phantoms the models know stay assessable ---------------------------------------


def test_a_generator_phantom_with_a_lesion_stays_assessable(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    ph = generate(PhantomSpec(seed=424242, diagnosis="PNET", lesion_diameter_mm=30.0,
                              spacing=(1.6, 1.6, 2.0)))
    img, _ = phantom_to_sitk(ph)
    rep = ct_pipeline.report(img)
    assert rep.assessable, rep.summary()
    app = rep.provenance["applicability"]
    assert app["series"]["state"] == "passed" and app["anatomy"]["state"] == "passed"
    assert app["competence"]["state"] in ("passed", "skipped")
    if read_manifest(SHIPPED_WEIGHTS / "pancreas-ct-stage2").competence is not None:
        assert app["competence"]["state"] == "passed"
        assert app["competence"]["values"]["distance"] <= \
            app["competence"]["values"]["threshold"]
    assert rep.lesions and (rep.lesions[0].mask & (ph.label == 2)).any()
    for les in rep.lesions:
        assert les.distance_to_pancreas_mm is not None
        assert 0.0 <= les.distance_to_pancreas_mm <= ct_pipeline.settings.lesion_margin_mm
    res = rep.to_result()
    assert res.assessed and res.segment("pancreas") is not None
    lesion = next(f for f in res.findings if f.kind == "lesion")
    assert lesion.details["distance_to_pancreas_mm"] == rep.lesions[0].distance_to_pancreas_mm


# --- 4. lesions only where the pancreas is --------------------------------------------


def test_a_candidate_outside_the_dilated_pancreas_is_dropped() -> None:
    roi = sitk.Image([40, 30, 20], sitk.sitkFloat32)
    roi.SetSpacing((2.5, 2.5, 2.5))
    gland = np.zeros((20, 30, 40), np.uint8)
    gland[8:12, 10:20, 5:20] = 1
    pancreas = sitk.GetImageFromArray(gland)
    pancreas.CopyInformation(roi)

    def cand(x0: int, x1: int) -> Candidate:
        m = np.zeros((20, 30, 40), bool)
        m[9:11, 12:15, x0:x1] = True
        return Candidate(mask=m, confidence=0.9, peak_index=(10, 13, x0))

    inside, near, far = cand(10, 13), cand(22, 24), cand(34, 37)
    kept, dropped = near_pancreas([inside, near, far], pancreas, roi, margin_mm=10.0)
    assert [c for c, _ in kept] == [inside, near]
    assert [c for c, _ in dropped] == [far]
    d = {id(c): dist for c, dist in kept + dropped}
    assert d[id(inside)] == 0.0
    assert d[id(near)] == pytest.approx(3 * 2.5)  # from x=22 to the gland's last x=19
    assert d[id(far)] == pytest.approx(15 * 2.5)
    kept0, _ = near_pancreas([near], pancreas, roi, margin_mm=5.0)
    assert kept0 == []


# --- 3. the competence check ------------------------------------------------------------


def test_ledoit_wolf_and_the_fitted_threshold() -> None:
    rng = np.random.default_rng(0)
    fit_x, val_x = rng.normal(size=(60, 40)), rng.normal(size=(40, 40))
    cov, shrink = ledoit_wolf(fit_x)
    assert 0.0 <= shrink <= 1.0 and np.all(np.linalg.eigvalsh(cov) > 0)
    # Independent unit-variance features: the truth *is* the scaled identity, full shrinkage.
    assert ledoit_wolf(rng.normal(size=(5000, 5)))[1] > 0.9
    # Strongly correlated features and plenty of data: almost the sample covariance.
    mix = np.array([[1.0, 0.9, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 3.0]])
    cov_c, small = ledoit_wolf(rng.normal(size=(5000, 3)) @ mix)
    assert small < 0.05
    np.testing.assert_allclose(cov_c, mix.T @ mix, rtol=0.1, atol=0.1)
    fit = fit_statistics(fit_x, val_x, percentile=99.0)
    assert fit.threshold == pytest.approx(np.percentile(fit.validation_distances, 99))
    stats = fit.arrays()
    near = competence_check(val_x[0], stats, fit.threshold)
    far = competence_check(val_x[0] + 5.0, stats, fit.threshold)
    assert near.passed is True
    assert far.passed is False and far.reason.startswith("competence check:")
    assert mahalanobis(val_x[0] + 5.0, stats) > fit.threshold
    skipped = competence_check(val_x[0], None, None)
    assert skipped.passed is None and "skipped" in skipped.values["note"]
    verdict = Applicability()
    verdict.add(skipped)
    assert verdict.failed is None
    assert verdict.provenance()["applicability"]["competence"]["state"] == "skipped"


def _package_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "pancreas-ct-stage2"
    shutil.copytree(SHIPPED_WEIGHTS / "pancreas-ct-stage2", dst)
    return dst


def test_competence_file_is_verified_by_sha256_and_a_tampered_one_is_refused(
        tmp_path: Path) -> None:
    pkg = _package_copy(tmp_path)
    rng = np.random.default_rng(1)
    fit = fit_statistics(rng.normal(size=(30, 288)), rng.normal(size=(20, 288)))
    write_competence(pkg, fit, fitted_on="test data", threshold_on="test data",
                     details={})
    loaded = load_package(pkg, "cpu")
    assert loaded.competence is not None
    assert loaded.manifest.competence is not None
    assert loaded.manifest.competence.threshold == pytest.approx(fit.threshold, abs=1e-3)
    np.testing.assert_allclose(loaded.competence["mean"], fit.mean)
    # the weights and their hash are untouched
    assert loaded.manifest.weights == read_manifest(SHIPPED_WEIGHTS /
                                                    "pancreas-ct-stage2").weights
    # tampered: other statistics under the declared name
    other = fit_statistics(rng.normal(size=(30, 288)) + 3, rng.normal(size=(20, 288)))
    other.save(pkg / "competence.npz")
    with pytest.raises(ModelError, match="competence file hash mismatch"):
        load_package(pkg, "cpu")
    (pkg / "competence.npz").unlink()
    with pytest.raises(ModelError, match=r"competence file .* is missing"):
        load_package(pkg, "cpu")
    # a package that declares none loads, and the pipeline skips the check, saying so
    write_manifest(pkg, read_manifest(pkg).model_copy(update={"competence": None}))
    assert "competence" not in (pkg / "model.yaml").read_text()
    assert load_package(pkg, "cpu").competence is None


def test_a_package_without_competence_statistics_skips_the_check(tmp_path: Path) -> None:
    pkg = _package_copy(tmp_path)
    write_manifest(pkg, read_manifest(pkg).model_copy(update={"competence": None}))
    (pkg / "competence.npz").unlink(missing_ok=True)
    from pipelines.pancreas.model import PancreasPipeline

    pipe = PancreasPipeline.from_packages("pancreas-ct", SHIPPED_WEIGHTS / "pancreas-ct-stage1",
                                          pkg, device="cpu")
    img, _ = phantom_to_sitk(generate(PhantomSpec(seed=77, diagnosis="PDAC",
                                                  lesion_diameter_mm=20.0)))
    rep = pipe.report(img)
    comp = rep.provenance["applicability"]["competence"]
    assert comp["state"] == "skipped" and "no competence statistics" in comp["values"]["note"]


def test_the_competence_check_refuses_features_far_from_training(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    comp = ct_pipeline.stage2.manifest.competence
    assert comp is not None, "the shipped CT stage 2 declares its competence statistics"
    stats = ct_pipeline.stage2.competence
    assert stats is not None
    # the training mean itself is inside; far along every feature is outside
    assert competence_check(stats["mean"], stats, comp.threshold).passed is True
    far = stats["mean"] + 10.0 * stats["scale"]
    assert competence_check(far, stats, comp.threshold).passed is False


# --- the report and the generic result --------------------------------------------------


def test_a_not_assessable_report_carries_nothing_but_its_reason() -> None:
    mask = np.ones((2, 4, 4), bool)
    rep = PancreasReport("pancreas-ct", AlgorithmInfo("ainode pancreas-ct", "1"), ["1", "2"],
                         0.0, True, mask, None, [], None,
                         provenance={"applicability_failed": "anatomy"},
                         not_assessable="anatomy check: the gland lies at the body's edge")
    assert not rep.assessable
    res = rep.to_result()
    assert res.status == "not_assessable"
    assert res.reason == "anatomy check: the gland lies at the body's edge"
    assert res.segments == [] and res.findings == []
    assert res.summary() == "Not assessable: anatomy check: the gland lies at the body's edge"


def test_the_mr_model_knows_its_own_phantoms_and_refuses_far_features() -> None:
    """The MR stage 2 has competence statistics too: a fresh training-generator MR phantom
    stays inside them, a feature vector far from them does not."""
    mr = build_pipeline("pancreas-mr", device="cpu")
    comp = mr.stage2.manifest.competence
    assert comp is not None and mr.stage2.competence is not None
    stats = mr.stage2.competence
    far = stats["mean"] + 10.0 * stats["scale"]
    assert competence_check(far, stats, comp.threshold).passed is False
    ph = generate(PhantomSpec(seed=424243, contrast="mr_t1", diagnosis="PDAC",
                              lesion_diameter_mm=30.0))
    img, _ = phantom_to_sitk(ph)
    rep = mr.report(img)
    app = rep.provenance["applicability"]
    assert app["competence"]["state"] == "passed", rep.summary()


def test_competence_features_come_from_seeds_and_folders_alike(
        ct_pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The fitting code reads generator seeds and MSD folders through one loop: the same
    phantom gives the same features either way."""
    from pipelines.phantom import write_dataset
    from pipelines.training.competence import collect_features, collect_folder_features

    ids, x, recs = collect_features(ct_pipeline, [424244], "ct")
    write_dataset(tmp_path, [424244])
    names, y, recs2 = collect_folder_features(ct_pipeline, tmp_path)
    assert ids == [424244] and len(names) == 1 and x.shape == y.shape == (1, x.shape[1])
    assert np.allclose(x, y, rtol=1e-2, atol=1e-2)  # the folder holds int16 HU (rounded)
    assert [r["failed"] for r in recs] == [r["failed"] for r in recs2]

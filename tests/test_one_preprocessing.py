"""One preprocessing path: a training sample and a job's model input of the same case
are the same array, because both are made by ``pipelines.preprocess.ModelInput``.

If they ever differ, the shipped models are run (and evaluated) on inputs they
were never trained on, which no accuracy test on the node's own output would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from pipelines.pancreas import build_pipeline
from pipelines.pancreas.model import PancreasPipeline, _Stage1
from pipelines.pancreas.preprocess import model_input, stage2_roi
from pipelines.phantom import write_dataset
from pipelines.preprocess import ModelInput
from pipelines.training.data import (
    find_cases,
    read_case,
    slice_samples,
    stage1_sample,
    stage2_sample,
)
from pipelines.training.recipes import RECIPES


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[sitk.Image, sitk.Image, str]:
    root = tmp_path_factory.mktemp("ct")
    write_dataset(root, [41])
    case = find_cases(root, "Tr")[0]
    img, lab = read_case(case)
    return img, lab, case.diagnosis or "normal"


@pytest.fixture(scope="module")
def mr_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[sitk.Image, sitk.Image]:
    root = tmp_path_factory.mktemp("mr")
    write_dataset(root, [100003], contrast="mr_t1")
    return read_case(find_cases(root, "Tr")[0])


@pytest.fixture(scope="module")
def ct_pipeline() -> PancreasPipeline:
    return build_pipeline("pancreas-ct", device="cpu")


def _job_input(pipeline: PancreasPipeline, img: sitk.Image, model: Any,
               ref: sitk.Image | None) -> np.ndarray:
    # What PancreasPipeline.run hands its stages: the image cast to float32.
    x, _ = model_input(sitk.Cast(img, sitk.sitkFloat32), model, ref)
    return x[0, 0].cpu().numpy()


def _recipe_matches_package(key: str, model: Any) -> None:
    """The training recipe is what the shipped package's contract says it was trained on."""
    recipe, inp = RECIPES[key], model.manifest.input
    assert recipe.preset == inp.intensity_preset
    assert tuple(recipe.spacing) == tuple(inp.spacing_mm)
    assert tuple(recipe.patch_zyx) == tuple(inp.patch_size)
    assert recipe.reorient == inp.reorient


def _orientation(key: str) -> str | None:
    return "LPS" if RECIPES[key].reorient else None


def test_ct_stage1_training_sample_is_the_job_input(ct_case: Any,
                                                   ct_pipeline: PancreasPipeline) -> None:
    img, lab, _ = ct_case
    _recipe_matches_package("ct-stage1", ct_pipeline.stage1)
    r = RECIPES["ct-stage1"]
    train, _ = stage1_sample(img, lab, r.spacing, r.preset, _orientation("ct-stage1"))
    job = _job_input(ct_pipeline, img, ct_pipeline.stage1, None)
    assert train.dtype == job.dtype == np.float32
    assert np.array_equal(train, job)
    assert 0.0 <= job.min() < job.max() <= 1.0  # (HU + 200) / 550, clipped


def test_ct_stage1_sees_a_ras_scan_as_the_lps_one(ct_case: Any,
                                                 ct_pipeline: PancreasPipeline) -> None:
    """A NIfTI in RAS and the same scan in LPS give stage 1 the same input: the
    contract reorients (lossless) before it resamples."""
    img, lab, _ = ct_case
    assert ct_pipeline.stage1.manifest.input.reorient
    ras = sitk.DICOMOrient(img, "RAS")
    assert ras.GetDirection() != img.GetDirection()
    r = RECIPES["ct-stage1"]
    job_lps = _job_input(ct_pipeline, img, ct_pipeline.stage1, None)
    job_ras = _job_input(ct_pipeline, ras, ct_pipeline.stage1, None)
    assert np.array_equal(job_lps, job_ras)
    train_ras, _ = stage1_sample(ras, sitk.DICOMOrient(lab, "RAS"), r.spacing, r.preset,
                                 _orientation("ct-stage1"))
    assert np.array_equal(train_ras, job_ras)


def test_ct_stage2_training_sample_is_the_job_input(ct_case: Any,
                                                   ct_pipeline: PancreasPipeline) -> None:
    """When stage 1 finds the reference gland, stage 2 sees the training ROI sample."""
    img, lab, _ = ct_case
    _recipe_matches_package("ct-stage2", ct_pipeline.stage2)
    r = RECIPES["ct-stage2"]
    train, target = stage2_sample(img, lab, r.spacing, r.patch_zyx, r.preset,
                                  margin_mm=ct_pipeline.settings.margin_mm, min_extra=0,
                                  orientation=_orientation("ct-stage2"))
    # The ROI grid PancreasPipeline.analyse builds from a stage-1 mask.
    gland = sitk.GetArrayFromImage(lab) > 0
    inp = ct_pipeline.stage2.manifest.input
    roi = stage2_roi(gland, lab, margin_mm=ct_pipeline.settings.margin_mm,
                     spacing=inp.spacing_mm, patch_zyx=inp.patch_size)
    job = _job_input(ct_pipeline, img, ct_pipeline.stage2, roi)
    assert np.array_equal(train, job)
    assert target.shape == job.shape


def test_ct_slice_training_stack_is_the_job_input(ct_case: Any,
                                                 ct_pipeline: PancreasPipeline) -> None:
    img, lab, diagnosis = ct_case
    assert ct_pipeline.slice_model is not None
    _recipe_matches_package("ct-slice", ct_pipeline.slice_model)
    r = RECIPES["ct-slice"]
    train, labels = slice_samples(img, lab, diagnosis, r.spacing, r.patch_zyx[-1], r.preset,
                                  margin_mm=ct_pipeline.settings.margin_mm,
                                  orientation=_orientation("ct-slice"))
    s1 = _Stage1(mask=sitk.GetArrayFromImage(lab) > 0, grid=lab, prob_max=1.0)
    job = ct_pipeline._slice_input(sitk.Cast(img, sitk.sitkFloat32), s1).cpu().numpy()
    assert np.array_equal(train, job)
    assert len(labels) == len(job)


def test_mr_training_samples_are_the_job_inputs(mr_case: Any) -> None:
    img, lab = mr_case
    mr = build_pipeline("pancreas-mr", device="cpu")
    _recipe_matches_package("mr-stage1", mr.stage1)
    _recipe_matches_package("mr-stage2", mr.stage2)
    r1, r2 = RECIPES["mr-stage1"], RECIPES["mr-stage2"]
    assert np.array_equal(stage1_sample(img, lab, r1.spacing, r1.preset)[0],
                          _job_input(mr, img, mr.stage1, None))
    gland = sitk.GetArrayFromImage(lab) > 0
    roi = stage2_roi(gland, lab, margin_mm=mr.settings.margin_mm, spacing=r2.spacing,
                     patch_zyx=r2.patch_zyx)
    assert np.array_equal(
        stage2_sample(img, lab, r2.spacing, r2.patch_zyx, r2.preset,
                      margin_mm=mr.settings.margin_mm, min_extra=0)[0],
        _job_input(mr, img, mr.stage2, roi),
    )


def test_training_jobs_and_evaluate_all_go_through_model_input(
    ct_case: Any, ct_pipeline: PancreasPipeline, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No second way in: every model input of a job, of ``ainode evaluate`` and of a
    training sample is made by ModelInput.forward."""
    from pipelines.evaluation.run import evaluate

    calls: list[str] = []
    original = ModelInput.forward

    def spy(self: ModelInput, image: sitk.Image, *, onto: sitk.Image | None = None) -> Any:
        calls.append(f"{self.preset}@{'roi' if onto is not None else 'scan'}")
        return original(self, image, onto=onto)

    monkeypatch.setattr(ModelInput, "forward", spy)
    img, lab, _ = ct_case
    ct_pipeline.run(img)
    job = list(calls)
    # stage 1 on the scan, then stage 2 and the slice classifier on ROI grids
    assert job[0] == "ct_pancreas@scan" and "ct_pancreas@roi" in job[1:]
    calls.clear()
    r = RECIPES["ct-stage1"]
    stage1_sample(img, lab, r.spacing, r.preset)
    assert calls == ["ct_pancreas@scan"]
    calls.clear()
    data = tmp_path / "eval"
    write_dataset(data, [41], images="imagesTs", labels="labelsTs")
    evaluate(data, tmp_path / "out", ct_pipeline, n_boot=10)
    assert calls == job  # the same case, the same inputs, in the same order

"""Tiny seeded training runs: losses, checkpoints, resume, packages, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from node.cli import app
from pipelines.models.package import load_package, verify_package
from pipelines.phantom import write_dataset
from pipelines.training.recipes import RECIPES
from pipelines.training.run import train_recipe


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, range(40, 46))
    return root


def test_stage2_trains_checkpoints_and_resumes(dataset: Path, tmp_path: Path) -> None:
    recipe = RECIPES["ct-stage2"]
    first = train_recipe(recipe, dataset, tmp_path, iterations=3, max_cases=4)
    assert first.iterations == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in first.losses.values())
    ckpt = tmp_path / f"{recipe.package}.ckpt"
    assert ckpt.exists()
    resumed = train_recipe(recipe, dataset, tmp_path, iterations=5, max_cases=4)
    assert resumed.iterations == 5
    assert torch.load(ckpt, weights_only=False)["it"] == 5
    # Resuming a finished run trains nothing more and returns the same weights.
    again = train_recipe(recipe, dataset, tmp_path, iterations=5, max_cases=4)
    a, b = resumed.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_and_slice_classifier_train(dataset: Path, tmp_path: Path) -> None:
    r1 = train_recipe(RECIPES["ct-stage1"], dataset, tmp_path, iterations=2, max_cases=3)
    assert r1.iterations == 2
    r3 = train_recipe(RECIPES["ct-slice"], dataset, tmp_path, iterations=2, max_cases=3)
    assert r3.losses["slices"] > 0


def test_time_budget_stops_training(dataset: Path, tmp_path: Path) -> None:
    res = train_recipe(RECIPES["ct-stage1"], dataset, tmp_path, iterations=10_000,
                       minutes=1e-4, max_cases=2)
    assert res.iterations < 10_000


def test_cli_train_writes_a_verified_package(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(out),
                                 "--task", "stage1", "--iterations", "2"])
    assert r.exit_code == 0, r.output
    m = verify_package(out)
    assert m.task == "pancreas-localisation"
    assert m.training.provenance["iterations"] == 2
    load_package(out, "cpu")


def test_cli_train_refuses_a_missing_folder(tmp_path: Path) -> None:
    from node.cli import main  # noqa: F401  (exit codes come from main's mapping)

    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "o"), "--task", "stage1"])
    assert r.exit_code != 0
    assert "not a folder" in str(r.exception) or "not a folder" in r.output


def test_head_finetune_changes_only_the_classifier(dataset: Path) -> None:
    from pipelines.models.networks import build
    from pipelines.training.data import find_cases, read_case, stage2_sample
    from pipelines.training.trainers import HeadConfig, finetune_stage2_head

    r = RECIPES["ct-stage2"]
    samples, classes = [], []
    for c in find_cases(dataset, "Tr")[:4]:
        img, lab = read_case(c)
        samples.append(stage2_sample(img, lab, r.spacing, r.patch_zyx, r.preset))
        classes.append(1 if samples[-1][1].any() else 0)
    model = build(r.arch, r.params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune_stage2_head(model, samples, classes, r.patch_zyx,
                               HeadConfig(crops_per_case=2, iterations=20, batch=4))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("cls_head.") for k in changed)
    assert res.losses["crops"] == 8 and 0.0 <= res.losses["train_crop_accuracy"] <= 1.0
    # The split forward (features + classify) is what inference runs.
    x = torch.randn(1, 1, *r.patch_zyx)
    with torch.no_grad():
        seg, cls = model(x)
        feats, seg2 = model.features(x)  # type: ignore[operator]
        assert torch.equal(seg, seg2)
        assert torch.allclose(cls, model.classify(feats[-3:], seg2))  # type: ignore[operator]
    assert all(p.requires_grad for p in model.parameters())


def test_window_features_follow_the_inference_windows(dataset: Path) -> None:
    from monai.inferers import sliding_window_inference

    from pipelines.models.networks import build
    from pipelines.training.data import find_cases, read_case, stage2_sample
    from pipelines.training.trainers import stage2_windows, window_features

    r = RECIPES["ct-stage2"]
    case = next(c for c in find_cases(dataset, "Tr") if c.diagnosis not in (None, "normal"))
    img, lab = read_case(case)
    x, y = stage2_sample(img, lab, r.spacing, r.patch_zyx, r.preset, margin_mm=10.0,
                         min_extra=0)
    model = build(r.arch, r.params).eval()
    feats, peaks, lesvox = stage2_windows(model, x, y, r.patch_zyx)
    # The same windows, in the same order, as the pipeline's sliding window (overlap 0.5).
    seen: list[float] = []

    def pred(p: torch.Tensor) -> torch.Tensor:
        seg, _ = model(p)
        seen.extend(torch.sigmoid(seg).amax(dim=(1, 2, 3, 4)).tolist())
        return seg

    with torch.inference_mode():
        sliding_window_inference(torch.as_tensor(x)[None, None], r.patch_zyx, 1, pred,
                                 overlap=0.5, mode="gaussian")
    assert len(feats) == len(peaks) == len(lesvox) == len(seen)
    assert feats.shape[1] == model.cls_head[0].in_features
    assert torch.allclose(torch.as_tensor(peaks), torch.as_tensor(seen, dtype=torch.float32))
    assert lesvox.max() > 0 and lesvox.max() <= float(y.sum())
    cls = 1
    f2, labels = window_features(model, [(x, y)], [cls], r.patch_zyx)
    assert torch.equal(f2, feats)
    assert set(labels.tolist()) <= {0, cls} and (labels == cls).any()
    assert ((labels == cls) == torch.as_tensor(lesvox >= 3)).all()


def test_head_finetune_on_windows_of_its_own_set(tmp_path: Path) -> None:
    from dataclasses import replace

    from pipelines.models.networks import build
    from pipelines.training.run import _finetune_head

    r = replace(RECIPES["ct-stage2"], head_iterations=6, head_windows=True,
                head_seeds=(50, 53), head_reset=False, head_lr=1e-4)
    model = build(r.arch, r.params)
    st = {"state_dict": model.state_dict(), "seconds": 1.0, "seeds": [0, 4], "cases": 4,
          "iterations": 1, "losses": {}}
    new = _finetune_head(r, tmp_path / "unused", tmp_path, st, 1.0, None)
    assert (tmp_path / "data-ct-head" / ".complete").read_text() == "50-53\n"
    changed = {k for k in st["state_dict"]
               if not torch.equal(st["state_dict"][k], new["state_dict"][k])}
    assert changed and all(k.startswith("cls_head.") for k in changed)
    assert new["head"]["windows"] is True and new["head"]["reset"] is False
    assert new["head"]["data"] == "seeds 50..52 (3 cases)"
    assert new["head"]["iterations"] == 6 and new["head"]["lr"] == 1e-4
    # Kept like the body's final weights: a rerun reads it back instead of retraining.
    again = _finetune_head(r, tmp_path / "unused", tmp_path, st, 1.0, None)
    assert all(torch.equal(again["state_dict"][k], new["state_dict"][k]) for k in changed)


def test_window_crops_are_the_windows_inference_uses(dataset: Path) -> None:
    """Without jitter, a window-placed training crop is exactly one of the windows the
    pipeline's sliding window cuts from the stage-1 ROI (box + 10 mm) of the same case;
    with jitter the crops move, and every window position gets drawn."""
    import numpy as np
    import SimpleITK as sitk  # noqa: N813
    from monai.inferers import sliding_window_inference

    from pipelines.preprocess import normalise, resample_like, roi_grid
    from pipelines.training.data import find_cases, read_case, stage2_sample
    from pipelines.training.trainers import _window_crop

    r = RECIPES["ct-stage2"]
    img, lab = read_case(find_cases(dataset, "Tr")[0])
    x, y = stage2_sample(img, lab, r.spacing, r.patch_zyx, r.preset)  # 20 mm: training
    # The pipeline's stage-2 grid for a stage-1 mask equal to the reference gland.
    mask = sitk.GetArrayFromImage(lab) > 0
    roi = roi_grid(mask, lab, margin_mm=10.0, spacing=r.spacing, min_size=r.patch_zyx[::-1])
    xr = normalise(sitk.GetArrayFromImage(resample_like(img, roi, default=-1000.0)), r.preset)
    assert np.array_equal(xr, stage2_sample(img, lab, r.spacing, r.patch_zyx, r.preset,
                                            margin_mm=10.0, min_extra=0)[0])
    assert all(a - b == 8 or b == p for a, b, p in zip(x.shape, xr.shape, r.patch_zyx,
                                                        strict=True))
    windows: list[np.ndarray] = []

    def keep(p: torch.Tensor) -> torch.Tensor:
        windows.extend(w[0].numpy().copy() for w in p)
        return p.clone()  # MONAI weights its output in place: never hand back the input

    with torch.inference_mode():
        sliding_window_inference(torch.tensor(xr)[None, None], r.patch_zyx, 1, keep,
                                 overlap=0.5, mode="gaussian")
    rng = np.random.default_rng(0)
    hit = set()
    for _ in range(60):
        xc, yc = _window_crop(x, y, r.patch_zyx, rng, margin_vox=4, jitter=0, overlap=0.5)
        assert xc.shape == yc.shape == r.patch_zyx
        same = [i for i, w in enumerate(windows) if np.allclose(w, xc, atol=1e-5)]
        assert same, "a crop that is not an inference window"
        hit.update(same)
    assert len(hit) == len(windows)
    jittered = {_window_crop(x, y, r.patch_zyx, rng, 4, 4, 0.5)[0].tobytes()
                for _ in range(60)}
    assert len(jittered) > len(windows)


def test_refine_continues_the_whole_model_on_more_phantoms(dataset: Path,
                                                          tmp_path: Path) -> None:
    from dataclasses import replace

    from pipelines.models.networks import build
    from pipelines.training.run import _refine

    r = replace(RECIPES["ct-stage2"], refine_iterations=4, refine_seeds=(60, 62),
                window_crops=0.5)
    model = build(r.arch, r.params)
    st = {"state_dict": model.state_dict(), "seconds": 1.0, "seeds": [40, 44], "cases": 4,
          "iterations": 10, "losses": {}}
    new = _refine(r, dataset, tmp_path, st, 1.0, None)
    assert (tmp_path / "data-ct-refine" / ".complete").read_text() == "60-62\n"
    changed = {k for k in st["state_dict"]
               if not torch.equal(st["state_dict"][k], new["state_dict"][k])}
    assert any(k.startswith("cls_head.") for k in changed)
    assert any(not k.startswith("cls_head.") for k in changed)  # the body moved too
    assert new["iterations"] == 14 and new["refine"]["iterations"] == 4
    assert new["refine"]["data"] == "seeds 40..43 and 60..61 (6 cases)"
    assert new["refine"]["window_crops"] == 0.5
    again = _refine(r, dataset, tmp_path, st, 1.0, None)
    assert all(torch.equal(again["state_dict"][k], new["state_dict"][k]) for k in changed)


def test_randomised_refine_trains_on_its_own_sets_without_the_held_out_source(
        tmp_path: Path) -> None:
    """Stage 2's last step: randomised appearance (never the held-out AMOS anatomy), the
    real CT with painted lesions and generator phantoms, each generated once."""
    import csv
    from dataclasses import replace

    from pipelines.models.networks import build
    from pipelines.phantom.randomised import source_of
    from pipelines.training.recipes import HELD_OUT_SOURCES
    from pipelines.training.run import _refine_randomised

    seeds = range(0, 6)
    assert {source_of(s) for s in seeds} & set(HELD_OUT_SOURCES)  # one would be drawn
    r = replace(RECIPES["ct-stage2"], randomised_seeds=(0, 6), realct_seeds=(0, 1),
                generator_seeds=(60, 61), randomised_iterations=2, reorient=True)
    model = build(r.arch, r.params)
    st = {"state_dict": model.state_dict(), "seconds": 1.0, "seeds": [40, 44], "cases": 4,
          "iterations": 10, "losses": {}}
    new = _refine_randomised(r, tmp_path, st, 1.0, None)
    mixed = tmp_path / "data-ct-randomised-mixed"
    rows = list(csv.DictReader((mixed / "cases.csv").open()))
    assert rows and all(row["source"] not in HELD_OUT_SOURCES for row in rows)
    assert len(rows) == sum(source_of(s) not in HELD_OUT_SOURCES for s in seeds)
    assert (tmp_path / "data-ct-randomised-realct" / "cases.csv").exists()
    assert (tmp_path / "data-ct-60-61" / ".complete").exists()
    assert new["iterations"] == 12 and new["randomised"]["iterations"] == 2
    assert "data-ct-randomised-mixed" in new["randomised"]["data"]
    changed = [k for k in st["state_dict"]
               if not torch.equal(st["state_dict"][k], new["state_dict"][k])]
    assert changed


def test_stage1_crops_reach_into_air_and_stacks_end_inside_the_gland() -> None:
    import numpy as np

    from pipelines.training.trainers import _truncate

    rng = np.random.default_rng(0)
    x = np.ones((20, 8, 8), np.float32)
    y = np.zeros((20, 8, 8), np.uint8)
    y[5:15, 3:5, 3:5] = 1
    cuts = set()
    for _ in range(20):
        xt, yt = _truncate(x, y, rng)
        kept = np.nonzero(xt.any(axis=(1, 2)))[0]
        assert 0 < len(kept) < 20 and (yt <= y).all()
        gland = np.nonzero(yt.any(axis=(1, 2)))[0]
        assert len(gland) and (gland[0] == 5 or gland[-1] == 14)  # one end is kept whole
        assert kept[0] == 0 or kept[-1] == 19  # the cut is at one end only
        cuts.add((int(kept[0]), int(kept[-1])))
    assert len(cuts) > 3
    assert (x == 1).all()  # the sample itself is left as it was

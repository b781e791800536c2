"""The randomised (SynthSeg-style) phantoms: deterministic, appearance varied per case,
lesions only in the pancreas, lookalikes only outside it, deformed anatomy, real
label-map sources and the Task07 layout the training and evaluation code read."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from pipelines.phantom.labelmaps import (
    PANCREAS_CODES,
    STRUCTURES,
    LabelMap,
    code,
    data_root,
    load_source,
    real_sources_available,
)
from pipelines.phantom.randomised import (
    RandomisedSpec,
    add_lookalikes,
    deform,
    insert_lesion,
    synthesise,
    write_randomised_dataset,
)

SP = (3.0, 3.0, 3.0)  # coarse grid: these tests must stay fast
REAL = real_sources_available()
NO_DATA = f"{data_root()} absent (real label maps): the project expects ../shared/data"


def _case(seed: int, **kw: Any) -> Any:
    return synthesise(RandomisedSpec(seed=seed, source=kw.pop("source", "generator"),
                                     spacing=kw.pop("spacing", SP), **kw))


def test_same_seed_same_case_other_seed_other_case() -> None:
    a, b = _case(11), _case(11)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.intensities == b.intensities and a.contrast == b.contrast
    c = _case(12)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_every_structure_intensity_varies_across_seeds() -> None:
    cases = [_case(s, contrast="portal_venous") for s in (21, 22, 23, 24)]
    drawn: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}
    for c in cases:
        for name, v in c.intensities.items():
            drawn.setdefault(name, []).append(v)
            m = c.tissue == code(name)
            if m.sum() >= 30:
                measured.setdefault(name, []).append(float(np.median(c.image[m])))
    for name, vals in drawn.items():
        if len(vals) >= 2:
            assert len(set(vals)) == len(vals), f"{name}: one fixed value {vals}"
    for name in ("fat", "liver", "spleen", "kidney", "aorta", "pancreas", "bone", "muscle"):
        assert np.ptp(measured[name]) > 4.0, f"{name}: {measured[name]}"


def test_mr_contrasts_follow_t1_and_t2() -> None:
    t1 = _case(31, modality="MR", contrast="T1", diagnosis="normal")
    t2 = _case(31, modality="MR", contrast="T2", diagnosis="normal")
    for c in (t1, t2):
        assert c.image.min() >= 0 and c.modality == "MR"
    p1, p2 = t1.intensities["pancreas"], t2.intensities["pancreas"]
    assert p1 > t1.intensities["liver"] * 0.8 and p1 > 3 * t1.intensities["bowel_fluid"]
    assert t2.intensities["bowel_fluid"] > 1.8 * p2  # fluid brightest on T2


@pytest.mark.parametrize("diagnosis", ["PDAC", "PNET", "IPMN", "other_benign"])
def test_lesion_lies_in_the_pancreas(diagnosis: str) -> None:
    rng = np.random.default_rng(5)
    m, _ = deform(load_source("generator", rng, 2.0), rng, spacing=(2.0, 2.0, 2.0))
    gland = np.isin(m.codes, PANCREAS_CODES)
    w, info = insert_lesion(m, rng, diagnosis, diameter_mm=18.0)
    lesion = m.codes == code("lesion")
    assert lesion.any() and info["location"] in ("head", "neck", "body", "tail")
    out_d = ndimage.distance_transform_edt(~gland, sampling=m.spacing[::-1])
    assert out_d[lesion].max() <= info["bulge_mm"] + 1e-6  # never past its bulge margin
    assert (gland & lesion).sum() >= 0.5 * lesion.sum()
    assert ndimage.label(lesion)[1] == 1  # one lesion, one object
    assert np.all(w[~ndimage.binary_dilation(gland, iterations=4)] == 0)


def test_lesion_appearance_follows_its_type() -> None:
    means = {}
    for dx in ("PDAC", "PNET", "IPMN", "other_benign"):
        c = _case(41, diagnosis=dx, contrast="arterial", lesion_diameter_mm=25.0)
        assert (c.label == 2).any() and c.lesion_location in ("head", "neck", "body", "tail")
        means[dx] = (c.intensities["lesion"], c.intensities["pancreas"])
    assert means["PDAC"][0] < means["PDAC"][1] - 20  # hypo-attenuating
    assert means["PNET"][0] > means["PNET"][1] + 30  # hyper-enhancing (arterial)
    assert means["IPMN"][0] < 40  # near water
    normal = _case(41, diagnosis="normal")
    assert not (normal.label == 2).any() and normal.lesion_diameter_mm is None


def test_lookalikes_lie_outside_the_pancreas() -> None:
    kinds: set[str] = set()
    for seed in (51, 52):
        c = _case(seed)
        kinds |= {d["kind"] for d in c.lookalikes}
        near = ndimage.binary_dilation(c.label > 0)
        for name in ("cyst", "calcification", "vessel_small"):
            assert not ((c.tissue == code(name)) & near).any(), name
    assert {"bowel_loop", "vessel", "calcification"} <= kinds
    rng = np.random.default_rng(3)
    m, _ = deform(load_source("generator", rng, 2.0), rng, spacing=(2.0, 2.0, 2.0))
    before = m.pancreas().copy()
    add_lookalikes(m, rng)
    assert np.array_equal(m.pancreas(), before)  # the gland is untouched


def _on_grid(a: LabelMap, ref: LabelMap) -> np.ndarray:
    img = sitk.GetImageFromArray(a.pancreas().astype(np.uint8))
    img.SetSpacing(a.spacing)
    img.SetOrigin(a.origin)
    r = sitk.Image(ref.codes.shape[::-1], sitk.sitkUInt8)
    r.SetSpacing(ref.spacing)
    r.SetOrigin(ref.origin)
    return sitk.GetArrayFromImage(sitk.Resample(img, r, sitk.Transform(),
                                                sitk.sitkNearestNeighbor)) > 0


def test_elastic_deformation_keeps_one_plausible_pancreas_and_changes_it() -> None:
    src = load_source("generator", np.random.default_rng(0), 2.0)
    same, _ = deform(src, np.random.default_rng(1), spacing=(2.0, 2.0, 2.0), strength=0.0,
                     partial_fov=False)
    v0 = int(same.pancreas().sum())
    for seed in (2, 3, 4):
        m, info = deform(src, np.random.default_rng(seed), spacing=(2.0, 2.0, 2.0))
        p = m.pancreas()
        lab, n = ndimage.label(p, structure=np.ones((3, 3, 3), bool))
        sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
        assert sizes.max() >= 0.95 * p.sum()  # one main component
        assert 0.6 * v0 <= p.sum() <= 1.7 * v0  # plausible volume (body-size scaling)
        q = _on_grid(same, m)
        dice = 2 * (p & q).sum() / (p.sum() + q.sum())
        assert 0.2 < dice < 0.9, (dice, info)  # the same gland, in another shape


@pytest.mark.parametrize("source", ["amos", "totalseg"])
def test_real_label_map_source(source: str) -> None:
    assert REAL[source], NO_DATA  # CI has ../shared/data; absent data fails, as elsewhere
    c = _case(61, source=source, diagnosis="PDAC", lesion_diameter_mm=20.0)
    assert c.source == source
    present = {STRUCTURES[i] for i in np.unique(c.tissue)}
    assert {"liver", "spleen", "kidney", "aorta", "bone", "fat", "pancreas"} <= present
    assert (c.label == 1).sum() * np.prod(c.spacing) > 5000  # > 5 ml of gland
    assert (c.label == 2).any()
    assert c.image.min() >= -1024 and np.median(c.image[c.tissue == code("fat")]) < -40


def test_dataset_is_read_by_training_and_evaluation(tmp_path: Path) -> None:
    from pipelines.evaluation.run import evaluate
    from pipelines.training.data import find_cases, read_case

    rows = write_randomised_dataset(tmp_path, [71, 72], source="generator",
                                    images="imagesTs", labels="labelsTs", spacing=SP)
    assert [r["case_id"] for r in rows] == ["randomised_000071", "randomised_000072"]
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == [r["case_id"] for r in rows]
    for case, row in zip(cases, rows, strict=True):
        assert case.diagnosis == row["diagnosis"]
        img, lab = read_case(case)
        assert img.GetSize() == lab.GetSize() and img.GetSpacing() == pytest.approx(SP)
        arr = sitk.GetArrayFromImage(lab)
        assert set(np.unique(arr)) <= {0, 1, 2} and (arr == 1).any()
        assert ((arr == 2).any()) == (row["diagnosis"] != "normal")
    with (tmp_path / "cases.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert all(r["source"] == "generator" and r["modality"] == "CT" for r in got)

    class Blind:  # a pipeline that finds nothing: the loader, not a model, is under test
        name = "blind"

        def report(self, img: sitk.Image) -> Any:
            shape = sitk.GetArrayViewFromImage(img).shape
            return SimpleNamespace(lesions=[], patient_score=0.0, pancreas_found=False,
                                   pancreas_mask=np.zeros(shape, bool))

    metrics = evaluate(tmp_path, tmp_path / "eval", Blind(), n_boot=5)
    assert (tmp_path / "eval" / "metrics.json").is_file() and metrics["pipeline"] == "blind"


def test_lesion_in_the_real_ct_background(tmp_path: Path) -> None:
    assert REAL["totalseg"], NO_DATA  # CI has ../shared/data; absent data fails, as elsewhere
    from pipelines.phantom.labelmaps import TOTALSEG_CT, TOTALSEG_SEG

    ct = sitk.ReadImage(str(data_root() / TOTALSEG_CT), sitk.sitkFloat32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root() / TOTALSEG_SEG)))
    hu = sitk.GetArrayFromImage(ct)
    c = synthesise(RandomisedSpec(seed=81, source="realct", diagnosis="IPMN",
                                  lesion_diameter_mm=20.0))
    assert c.image.shape == hu.shape and c.direction == ct.GetDirection()
    lesion = c.label == 2
    gland = seg == 7  # TotalSegmentator's pancreas
    assert lesion.any() and (gland & lesion).any()
    out_mm = ndimage.distance_transform_edt(~gland, sampling=ct.GetSpacing()[::-1])
    assert out_mm[lesion].max() <= 6.0 + 1e-6  # within its bulge margin of the gland
    far = ~ndimage.binary_dilation(lesion, iterations=3)
    assert np.array_equal(c.image[far], hu[far])  # the real CT elsewhere, untouched
    assert abs(float(np.median(c.image[lesion])) - c.intensities["lesion"]) < 15
    rows = write_randomised_dataset(tmp_path, [81], source="realct")
    from pipelines.training.data import find_cases, read_case

    img, lab = read_case(find_cases(tmp_path)[0])
    assert img.GetDirection() == ct.GetDirection() and rows[0]["source"] == "realct"
    assert (sitk.GetArrayFromImage(lab) == 2).any()

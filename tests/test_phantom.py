"""The phantom generator: deterministic, typed lesion appearance, Task07 layout, DICOM."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from pipelines.phantom import PhantomSpec, generate, write_dataset, write_dicom_series
from pipelines.phantom.generator import expected_lesion_voxels


def test_same_seed_same_phantom_other_seed_other_phantom() -> None:
    a, b = generate(PhantomSpec(seed=7)), generate(PhantomSpec(seed=7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    c = generate(PhantomSpec(seed=8))
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", [1, 2])
def test_lesion_appearance_follows_its_type(seed: int) -> None:
    spacing = (1.5, 1.5, 2.0)
    means = {}
    for dx in ("PDAC", "PNET", "IPMN", "other_benign"):
        p = generate(PhantomSpec(seed=seed, diagnosis=dx, lesion_diameter_mm=25.0,
                                 spacing=spacing))
        gland = p.image[p.label == 1]
        lesion = p.image[p.label == 2]
        assert lesion.size > 0.3 * expected_lesion_voxels(25.0, spacing)
        means[dx] = (float(np.median(lesion)), float(np.median(gland)))
        assert p.lesion_location in ("head", "neck", "body", "tail")
    assert means["PDAC"][0] < means["PDAC"][1] - 25  # hypo-attenuating
    assert means["PNET"][0] > means["PNET"][1] + 25  # hyper-enhancing
    assert means["IPMN"][0] < 35 and means["other_benign"][0] < 35  # fluid


def test_pdac_dilates_the_upstream_duct() -> None:
    normal = generate(PhantomSpec(seed=3, diagnosis="normal", spacing=(1.0, 1.0, 1.5)))
    pdac = generate(PhantomSpec(seed=3, diagnosis="PDAC", lesion_diameter_mm=15.0,
                                spacing=(1.0, 1.0, 1.5)))
    fluid_normal = int(((normal.label == 1) & (normal.image < 45)).sum())
    fluid_pdac = int(((pdac.label == 1) & (pdac.image < 45)).sum())
    assert fluid_pdac > fluid_normal
    assert normal.lesion_diameter_mm is None and not (normal.label == 2).any()


def test_mr_t1_contrast_is_not_hounsfield() -> None:
    p = generate(PhantomSpec(seed=4, contrast="mr_t1", diagnosis="normal"))
    assert p.image.min() >= 0
    fat_like = np.percentile(p.image, 99)
    assert fat_like > np.median(p.image[p.label == 1])  # fat brightest on T1


def test_task07_layout_and_cases_csv(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, [5, 6], images="imagesTs", labels="labelsTs")
    assert [r["case_id"] for r in rows] == ["phantom_00005", "phantom_00006"]
    img = sitk.ReadImage(str(tmp_path / "imagesTs" / "phantom_00005_0000.nii.gz"))
    lab = sitk.ReadImage(str(tmp_path / "labelsTs" / "phantom_00005.nii.gz"))
    assert img.GetSize() == lab.GetSize()
    assert img.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(sitk.GetArrayFromImage(lab))) <= {0, 1, 2}
    with (tmp_path / "cases.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [r["case_id"] for r in got] == ["phantom_00005", "phantom_00006"]
    assert all(r["diagnosis"] for r in got)


def test_dicom_series_round_trips_through_the_volume_loader(tmp_path: Path) -> None:
    from pipelines.volume import load_series

    p = generate(PhantomSpec(seed=9, spacing=(1.8, 1.8, 3.0)))
    paths = write_dicom_series(p, tmp_path / "dcm", seed=9)
    vol = load_series(paths)
    assert vol.shape == p.image.shape
    assert vol.spacing == pytest.approx(p.spacing, abs=1e-3)
    assert vol.origin == pytest.approx(p.origin, abs=1e-3)
    assert np.abs(vol.array - np.round(p.image)).max() <= 1.0
    assert len(set(vol.sop_instance_uids)) == len(paths)


# Computed from generate() before generate_labelmap() was added (the shipped weights
# were trained on these phantoms): label sha256, and the image's sum and sum of
# squares (float64), which a change of the drawing would move.
_GENERATOR_REFERENCE = {
    (3, "ct"): ("1d47c5acc5bf0303", -364383333.52300906, 379674625378.0463),
    (7, "mr_t1"): ("43fcc34967ba402f", 602456215.3012578, 439025210423.2356),
}


@pytest.mark.parametrize(("seed", "contrast"), list(_GENERATOR_REFERENCE))
def test_generator_output_is_unchanged(seed: int, contrast: str) -> None:
    import hashlib

    p = generate(PhantomSpec(seed=seed, contrast=contrast))  # type: ignore[arg-type]
    label_sha, total, squares = _GENERATOR_REFERENCE[(seed, contrast)]
    assert hashlib.sha256(p.label.tobytes()).hexdigest()[:16] == label_sha
    img = p.image.astype(np.float64)
    assert float(img.sum()) == pytest.approx(total, rel=1e-7)
    assert float((img**2).sum()) == pytest.approx(squares, rel=1e-7)


def test_labelmap_is_the_same_phantom_with_its_tissues() -> None:
    from pipelines.phantom.generator import TISSUES, generate_labelmap

    spec = PhantomSpec(seed=3)
    p, tissue = generate_labelmap(spec)
    q = generate(spec)
    assert np.array_equal(p.image, q.image) and np.array_equal(p.label, q.label)
    assert tissue.shape == p.label.shape
    assert np.array_equal(tissue == TISSUES.index("lesion"), p.label == 2)
    assert np.all(np.isin(tissue[p.label == 1], [TISSUES.index("pancreas"),
                                                   TISSUES.index("duct")]))
    assert {"liver", "spleen", "kidney", "bone", "fat"} <= {TISSUES[i] for i in np.unique(tissue)}

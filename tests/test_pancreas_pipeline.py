"""The registered pancreas pipelines with the shipped demo weights, on phantoms and real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import registry
from pipelines.pancreas import build_pipeline
from pipelines.pancreas.model import SHIPPED_WEIGHTS, aggregate_slices
from pipelines.pancreas.output import TUMOUR_TYPES, PancreasReport
from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk, write_dicom_series
from tests.support.data import dicom_series_dir


def test_the_demo_weights_are_shipped() -> None:
    # Committed with the code; every test below relies on them.
    for part in ("stage1", "stage2"):
        assert (SHIPPED_WEIGHTS / f"pancreas-ct-{part}" / "model.yaml").exists()


@pytest.fixture(scope="module")
def ct_pipeline():  # type: ignore[no-untyped-def]
    return build_pipeline("pancreas-ct", device="cpu")


def _check_well_formed(res: PancreasReport, shape: tuple[int, int, int]) -> None:
    assert 0.0 <= res.patient_score <= 1.0
    if res.not_assessable is not None:  # refused by the applicability step: nothing reported
        assert res.lesions == [] and res.summary().startswith("Not assessable: ")
        assert res.to_result().segments == [] and res.to_result().findings == []
    elif res.pancreas_found:
        assert res.pancreas_mask is not None and res.pancreas_mask.shape == shape
        assert res.lesion_probability is not None and res.lesion_probability.shape == shape
        for les in res.lesions:
            assert les.mask.shape == shape and les.mask.any()
            assert 0.0 < les.confidence <= 1.0
            assert les.diameter_mm > 0 and les.volume_ml > 0
    else:
        assert res.lesions == [] and "not found" in res.summary()
    if res.classification is not None:
        assert set(res.classification) == set(TUMOUR_TYPES)
        assert sum(res.classification.values()) == pytest.approx(1.0, abs=1e-4)


def test_registry_builds_both_pipelines_once() -> None:
    assert {"pancreas-ct", "pancreas-mr"} <= set(registry.available())
    p = registry.get("pancreas-ct")
    assert registry.get("pancreas-ct") is p
    assert "pancreas-ct-stage2" in p.model_identity()
    assert len(p.model_version()) <= 64
    assert "pancreas-mr-stage2" in registry.get("pancreas-mr").model_identity()


def test_phantom_with_a_large_lesion_is_found_on_the_source_grid(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    ph = generate(PhantomSpec(seed=424242, diagnosis="PNET", lesion_diameter_mm=30.0,
                              spacing=(1.6, 1.6, 2.0)))
    img, _ = phantom_to_sitk(ph)
    res = ct_pipeline.report(img)
    _check_well_formed(res, ph.image.shape)
    assert res.pancreas_found
    gland = ph.label > 0
    assert (res.pancreas_mask & gland).sum() > 0.3 * gland.sum()
    assert res.lesions, res.summary()
    top = res.lesions[0]
    assert (top.mask & (ph.label == 2)).any()
    assert top.mean_hu is not None
    assert res.provenance["timings"]["stage2_s"] > 0


def test_results_are_deterministic_on_cpu(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    img, _ = phantom_to_sitk(generate(PhantomSpec(seed=77, diagnosis="PDAC",
                                                  lesion_diameter_mm=20.0)))
    a, b = ct_pipeline.report(img), ct_pipeline.report(img)
    assert a.patient_score == b.patient_score
    assert np.array_equal(a.lesion_probability, b.lesion_probability)


def test_run_gives_the_report_in_the_generic_contract(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    img, _ = phantom_to_sitk(generate(PhantomSpec(seed=77, diagnosis="PDAC",
                                                  lesion_diameter_mm=20.0)))
    rep, res = ct_pipeline.report(img), ct_pipeline.run(img)
    assert res.summary() == rep.summary()
    assert res.assessed == rep.pancreas_found
    assert [s.key for s in res.segments] == \
        (["pancreas"] if rep.pancreas_mask is not None else []) + \
        [f"lesion-{les.index}" for les in rep.lesions]
    patient, *lesions = res.findings
    assert (patient.kind, patient.label, patient.probability) == \
        ("patient", "Patient-level PDAC probability", rep.patient_score)
    assert patient.details["pancreas_found"] == rep.pancreas_found
    for f, les in zip(lesions, rep.lesions, strict=True):
        assert (f.kind, f.probability, f.size_mm, f.location) == \
            ("lesion", les.confidence, les.diameter_mm, les.location)
        seg = res.segment(f.segment or "")
        assert seg is not None and np.array_equal(seg.mask, les.mask)


def test_dicom_phantom_through_the_volume_loader(ct_pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipelines.volume import load_series

    ph = generate(PhantomSpec(seed=5151, diagnosis="other_benign", lesion_diameter_mm=25.0))
    vol = load_series(write_dicom_series(ph, tmp_path, seed=5151))
    res = ct_pipeline.report(vol)
    _check_well_formed(res, vol.shape)
    assert res.source_sop_instance_uids == vol.sop_instance_uids


def test_real_ct_gives_a_roi_or_an_explicit_not_found(ct_pipeline) -> None:  # type: ignore[no-untyped-def]
    from pipelines.volume import load_series

    vol = load_series(sorted(dicom_series_dir("ct_abdomen_siemens").glob("*.dcm")))
    res = ct_pipeline.report(vol)
    _check_well_formed(res, vol.shape)
    assert len(res.source_sop_instance_uids) == vol.shape[0]
    assert res.summary()


def test_mr_pipeline_runs_on_a_t1_phantom() -> None:
    pipe = build_pipeline("pancreas-mr", device="cpu")
    ph = generate(PhantomSpec(seed=31, contrast="mr_t1", diagnosis="IPMN",
                              lesion_diameter_mm=25.0))
    img, _ = phantom_to_sitk(ph)
    res = pipe.report(img)
    _check_well_formed(res, ph.image.shape)
    assert all(les.mean_hu is None for les in res.lesions)  # no HU on MR


@pytest.mark.parametrize("hierarchical", [False, True])
def test_slice_aggregation(hierarchical: bool) -> None:
    p = np.full((10, 5), [0.96, 0.01, 0.01, 0.01, 0.01])
    p[4] = [0.1, 0.7, 0.1, 0.05, 0.05]
    p[5] = [0.2, 0.6, 0.1, 0.05, 0.05]
    d = aggregate_slices(p, top_k=2, hierarchical=hierarchical)
    assert sum(d.values()) == pytest.approx(1.0)
    assert max(d, key=d.get) == "PDAC"  # type: ignore[arg-type]
    assert aggregate_slices(np.zeros((0, 5)))["normal"] == 1.0


def test_gland_is_the_main_part_and_its_sizeable_neighbours() -> None:
    """At 3 mm the neck breaks: the head 24 mm from the body stays, a blob far away or a
    speck does not."""
    from pipelines.pancreas.model import gland_components

    m = np.zeros((20, 60, 60), bool)
    m[8:12, 10:20, 10:30] = True  # body and tail: 800 voxels
    m[8:12, 10:20, 38:45] = True  # head, 8 voxels = 24 mm away: 280 voxels
    m[8:12, 50:55, 10:15] = True  # a blob 30 voxels = 90 mm away: 100 voxels
    m[15, 10, 32] = True  # a speck 6 mm away
    kept = gland_components(m, (3.0, 3.0, 3.0), join_mm=30.0, min_part=0.1)
    assert kept[8:12, 10:20, 10:30].all() and kept[8:12, 10:20, 38:45].all()
    assert not kept[8:12, 50:55, 10:15].any() and not kept[15, 10, 32]
    only = gland_components(m, (3.0, 3.0, 3.0), join_mm=20.0, min_part=0.1)
    assert not only[8:12, 10:20, 38:45].any()  # beyond the join distance

"""Evidence maps (issue 20): Grad-CAM sanity checks, the PMAP and EVSC objects, their render.

The sanity checks are those of Adebayo et al. (2018): a saliency map that does
not change when the model's weights are randomised, or when the evidence is
taken out of the input, shows the input's edges, not the model's reasons.
Similarity is the Spearman rank correlation of the two maps on the stage-2
region, as in the paper. Objects are validated by dciodvfy (dicom3tools).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
from PIL import Image
from scipy import ndimage

from pipelines.dicom_out import registry, write_results
from pipelines.dicom_out.evidence import (
    LESION_OUTLINE_RGB,
    MIN_VISIBLE,
    blend,
    read_pmap,
)
from pipelines.explain import spearman
from pipelines.pancreas import build_pipeline
from pipelines.pancreas.model import PancreasPipeline
from pipelines.pancreas.output import PancreasReport
from pipelines.phantom import Phantom, PhantomSpec, generate, phantom_to_sitk
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Job, Output, Series, Study
from tests.support.data import dicom_series_dir
from tests.test_dicom_out_writers import dciodvfy, load_sorted, make_result
from tests.test_render import ainode


@pytest.fixture(scope="module")
def pipe() -> PancreasPipeline:
    return build_pipeline("pancreas-ct", device="cpu")


@pytest.fixture(scope="module")
def pdac() -> Phantom:
    return generate(PhantomSpec(seed=77, diagnosis="PDAC", lesion_diameter_mm=20.0))


def _roi(pipe: PancreasPipeline, img: sitk.Image) -> sitk.Image:
    with torch.inference_mode():
        return pipe._roi(pipe._stage1(img))


@pytest.fixture(scope="module")
def original(pipe: PancreasPipeline, pdac: Phantom) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    img, _ = phantom_to_sitk(pdac)
    roi = _roi(pipe, img)
    cam = pipe.attribution(img, roi)
    assert cam is not None
    return img, roi, cam


def test_the_map_is_a_map_and_the_pipeline_puts_it_on_the_source_grid(
        pipe: PancreasPipeline, pdac: Phantom,
        original: tuple[sitk.Image, sitk.Image, np.ndarray]) -> None:
    _, roi, cam = original
    assert cam.shape == sitk.GetArrayViewFromImage(roi).shape
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    assert cam.std() > 0.05  # not flat: it ranks places
    img, _ = phantom_to_sitk(pdac)
    report = pipe.report(img)
    assert report.attribution is not None and report.attribution.shape == pdac.image.shape
    keys = [e.key for e in report.to_result().evidence]
    assert keys == ["lesion-probability", "gradcam"]
    assert "enc.1, enc.2, enc.3" in report.attribution_method


def test_the_map_changes_when_the_weights_are_randomised(
        pipe: PancreasPipeline, original: tuple[sitk.Image, sitk.Image, np.ndarray]) -> None:
    img, roi, cam = original
    net = copy.deepcopy(pipe.stage2.module)
    torch.manual_seed(0)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    random_pipe = dataclasses.replace(pipe, stage2=dataclasses.replace(pipe.stage2,
                                                                        module=net.eval()))
    randomised = random_pipe.attribution(img, roi)
    assert randomised is not None
    rho = spearman(cam, randomised)
    print(f"Spearman, trained vs randomised weights: {rho:.3f}")
    assert rho < 0.5


def test_the_map_changes_when_the_lesion_is_removed(
        pipe: PancreasPipeline, pdac: Phantom,
        original: tuple[sitk.Image, sitk.Image, np.ndarray]) -> None:
    _, roi, cam = original
    lesion, gland = pdac.label == 2, pdac.label == 1
    image = pdac.image.copy()
    rng = np.random.default_rng(0)
    image[lesion] = rng.normal(image[gland].mean(), image[gland].std(), int(lesion.sum()))
    healed = dataclasses.replace(pdac, image=image,
                                 label=np.where(lesion, 1, pdac.label).astype(np.uint8))
    img2, _ = phantom_to_sitk(healed)
    without = pipe.attribution(img2, roi)  # the same region: only the lesion differs
    assert without is not None
    rho = spearman(cam, without)
    print(f"Spearman, with vs without the lesion: {rho:.3f}")
    assert rho < 0.9


def test_the_map_is_not_the_same_for_every_case(
        pipe: PancreasPipeline, original: tuple[sitk.Image, sitk.Image, np.ndarray]) -> None:
    _, _, cam = original
    other = generate(PhantomSpec(seed=4242, diagnosis="PDAC", lesion_diameter_mm=25.0))
    img, _ = phantom_to_sitk(other)
    cam2 = pipe.attribution(img, _roi(pipe, img))
    assert cam2 is not None
    zoomed = ndimage.zoom(cam2, [a / b for a, b in zip(cam.shape, cam2.shape, strict=True)],
                          order=1)[:cam.shape[0], :cam.shape[1], :cam.shape[2]]
    rho = spearman(cam, zoomed)
    print(f"Spearman, two cases on one grid: {rho:.3f}")
    assert rho < 0.9


# --- the DICOM objects -----------------------------------------------------------------


def _report_with_attribution(sources: list[pydicom.Dataset]) -> PancreasReport:
    report = make_result(sources)
    assert report.lesion_probability is not None
    cam = np.zeros(report.lesion_probability.shape, np.float32)
    cam[9:14, 220:270, 190:260] = np.linspace(0.0, 1.0, 70, dtype=np.float32)[None, None, :]
    report.attribution = cam
    report.attribution_method = "test ramp"
    return report


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_sorted("ct_phantom_philips")


@pytest.mark.peers
def test_pmap_and_evsc_are_registered_not_default_and_dciodvfy_clean(
        sources: list[pydicom.Dataset], tmp_path: Path) -> None:
    assert {"PMAP", "EVSC"} <= set(registry.kinds())
    assert not {"PMAP", "EVSC"} & set(registry.default_kinds())
    assert "1.2.840.10008.5.1.4.1.1.30" in registry.result_sop_classes()
    report = _report_with_attribution(sources)
    objs = write_results(report.to_result(), sources, {"PMAP", "EVSC"})
    pmaps = [o.dataset for o in objs if o.kind == "PMAP"]
    scs = [o.dataset for o in objs if o.kind == "EVSC"]
    assert len(pmaps) == 2 and len({str(d.SeriesInstanceUID) for d in pmaps}) == 1
    assert scs
    for i, ds in enumerate([*pmaps, scs[0]]):
        assert dciodvfy(ds, tmp_path / f"ev{i}.dcm") == []
    # The values come back on the slices they were computed on.
    uids = [str(d.SOPInstanceUID) for d in sources]
    by_quantity = {m.quantity: m for m in (read_pmap(d) for d in pmaps)}
    cam = by_quantity["EV-GRADCAM"]
    assert report.attribution is not None
    for uid, values in cam.values.items():
        z = uids.index(uid)
        assert np.abs(values - report.attribution[z]).max() <= 1.0 / 65535 + 1e-6
    assert {uids.index(u) for u in cam.values} == set(range(9, 14))
    lesmap = by_quantity["EV-LESPROB"]
    assert report.lesion_probability is not None
    for uid, values in lesmap.values.items():
        assert np.abs(values - report.lesion_probability[uids.index(uid)]).max() < 2e-5


def test_the_evidence_sc_blends_colour_only_where_the_map_is(
        sources: list[pydicom.Dataset]) -> None:
    report = _report_with_attribution(sources)
    (first, *_) = [o.dataset for o in write_results(report.to_result(), sources, {"EVSC"})]
    z = [str(d.SOPInstanceUID) for d in sources].index(
        str(first.SourceImageSequence[0].ReferencedSOPInstanceUID))
    px = first.pixel_array[:int(sources[z].Rows)]
    assert report.attribution is not None
    cam = report.attribution[z]
    grey = np.all(px[..., :1] == px, axis=-1)
    cyan = np.all(px == LESION_OUTLINE_RGB, axis=-1)
    # Coloured where the map is (in the red-orange part of the scale, which no grey
    # level matches; white-hot over a white pixel would stay white).
    assert not grey[(cam >= 0.2) & (cam <= 0.6) & ~cyan].any()
    assert grey[(cam < MIN_VISIBLE) & ~cyan].all()  # untouched grey elsewhere
    assert np.array_equal(blend(np.zeros((2, 2), np.uint8), np.zeros((2, 2))),
                          np.zeros((2, 2, 3), np.uint8))


@pytest.mark.peers
def test_render_draws_the_evidence_from_the_stored_pmaps(
        sqlite_db: Database, filestore: FileStore, data_dir: Path, tmp_path: Path,
        sources: list[pydicom.Dataset]) -> None:
    files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    report = _report_with_attribution(sources)
    objs = write_results(report.to_result(), sources, {"SEG", "PMAP"})
    with sqlite_db.session() as s:
        study = Study(study_instance_uid=str(sources[0].StudyInstanceUID))
        series = Series(series_instance_uid=str(sources[0].SeriesInstanceUID), study=study)
        s.add_all([study, series])
        s.flush()
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            stored = filestore.write_instance(str(ds.StudyInstanceUID),
                                              str(ds.SeriesInstanceUID),
                                              str(ds.SOPInstanceUID), [f.read_bytes()])
            s.add(Instance(sop_instance_uid=str(ds.SOPInstanceUID), series_id=series.id,
                           sop_class_uid=str(ds.SOPClassUID),
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                           path=stored.relpath, size_bytes=stored.size, sha256=stored.sha256))
        job = Job(series=series, pipeline="pancreas-ct")
        s.add(job)
        s.flush()
        for o in objs:
            buf = io.BytesIO()
            o.dataset.save_as(buf, enforce_file_format=True)
            uid = str(o.dataset.SOPInstanceUID)
            stored = filestore.write_result(job.id, o.kind, uid, buf.getvalue())
            s.add(Output(job_id=job.id, kind=o.kind, sop_class_uid=str(o.dataset.SOPClassUID),
                         sop_instance_uid=uid,
                         series_instance_uid=str(o.dataset.SeriesInstanceUID),
                         path=stored.relpath))
    out = tmp_path / "png"
    proc = ainode(data_dir, "render", str(sources[0].SeriesInstanceUID), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    evidence = sorted(out.glob("evidence_*.png"))
    assert len(evidence) == 5  # the slices the attribution covers
    z = 11
    (png,) = [p for p in evidence if str(sources[z].SOPInstanceUID) in p.name]
    px = np.asarray(Image.open(png).convert("RGB"))[:int(sources[z].Rows)]
    assert report.attribution is not None
    coloured = ~np.all(px[..., :1] == px, axis=-1)
    cam = report.attribution[z]
    assert coloured[(cam >= 0.2) & (cam <= 0.6)].all()

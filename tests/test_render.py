"""``ainode render``: PNG slices with the SEG outline drawn exactly on the mask edge."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.dicom_out import write_results
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Finding, Instance, Job, Output, Series, Study
from tests.support.data import dicom_series_dir
from tests.test_dicom_out_writers import LESION1_SLICES, PANCREAS_SLICES, make_result

CLI = str(Path(sys.executable).with_name("ainode"))


def ainode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AINODE_STORAGE__DATA_DIR=str(data_dir), AINODE_STORAGE__MIN_FREE_MB="0")
    env.pop("AINODE_CONFIG", None)
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=data_dir)


def edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


@pytest.fixture
def rendered_series(sqlite_db: Database, filestore: FileStore
                    ) -> tuple[list[pydicom.Dataset], object]:
    """The phantom CT in the spool, a job with a SEG and findings, as the node leaves them."""
    files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    sources = sorted((pydicom.dcmread(f) for f in files),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    result = make_result(sources)
    (seg,) = write_results(result.to_result(), sources, {"SEG"})
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
        buf = io.BytesIO()
        seg.dataset.save_as(buf, enforce_file_format=True)
        uid = str(seg.dataset.SOPInstanceUID)
        stored = filestore.write_result(job.id, "SEG", uid, buf.getvalue())
        s.add(Output(job_id=job.id, kind="SEG", sop_class_uid=str(seg.dataset.SOPClassUID),
                     sop_instance_uid=uid, series_instance_uid=str(seg.dataset.SeriesInstanceUID),
                     path=stored.relpath))
        s.add(Finding(job_id=job.id, kind="patient", label="patient", probability=0.93))
        s.add(Finding(job_id=job.id, kind="lesion", label="lesion 1", probability=0.92,
                      location="head", diameter_mm=23.0))
    return sources, result


def test_render_draws_outline_on_mask_edge(rendered_series: tuple[list[pydicom.Dataset], object],
                                           data_dir: Path, tmp_path: Path) -> None:
    sources, result = rendered_series
    out = tmp_path / "png"
    proc = ainode(data_dir, "render", str(sources[0].SeriesInstanceUID), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(PANCREAS_SLICES)  # only slices with an outline
    z = LESION1_SLICES.start + 1
    (png,) = [p for p in pngs if str(sources[z].SOPInstanceUID) in p.name]
    full = np.asarray(Image.open(png).convert("RGB"))
    px = full[:int(sources[z].Rows)]  # the legend is on a band below the image
    lesion = result.lesions[0].mask[z]  # type: ignore[attr-defined]
    pancreas = result.pancreas_mask[z]  # type: ignore[attr-defined]
    red = np.all(px == (255, 0, 0), axis=-1)
    green = np.all(px == (0, 255, 0), axis=-1)
    # Outline pixels exactly where the mask edges are, and nowhere else.
    assert np.array_equal(red, edge(lesion))
    assert np.array_equal(green, edge(pancreas) & ~edge(lesion))
    legend = full[int(sources[z].Rows):, :300].astype(int)
    assert ((legend[..., 0] > 200) & (legend[..., 1] > 200) & (legend[..., 2] < 60)).sum() > 50


def test_render_unknown_series_is_refused(sqlite_db: Database, data_dir: Path,
                                          tmp_path: Path) -> None:
    proc = ainode(data_dir, "render", "1.2.3.4", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "no series" in proc.stderr

"""The shipped CT pancreas models on real abdominal CT (issue 16's acceptance).

Two real scans carry a TotalSegmentator pancreas (label 7): the TotalSegmentator
example CT (``example_ct_sm`` with ``example_seg``), whose label map *and* image
both CT models saw in training, and the Siemens series (``dicom/ct_abdomen_siemens``
with ``example_seg_dicom``), which CT stage 1 saw (30 lightly perturbed copies)
and stage 2 did not (pipelines/weights/*/MODEL_CARD.md). Both labels are model
predictions, not manual truth; they are the only pancreas labels on real images
this project has.

What must hold: stage 1 finds the gland (Dice >= 0.7 with the label, on the
source grid, as the SEG would carry it) and no lesion is reported away from it.
On the Siemens series stage 1 does not yet (0.5.0-demo: Dice 0.23, 1.0 ml of a
2.5 ml sliver at the bottom of a 4 cm stack, so the anatomy check refuses it), and
stage 2 judges neither scan (its competence check refuses the TotalSegmentator CT):
those checks are strict expected failures, which turn into failures the day the
models pass them, so that the marks come off.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from pipelines.evaluation.metrics import dice
from pipelines.pancreas import build_pipeline
from pipelines.pancreas.model import PancreasPipeline
from pipelines.pancreas.output import PancreasReport
from pipelines.volume import Volume, load_series
from tests.support.data import SHARED_DATA

PANCREAS_LABEL = 7
TS = SHARED_DATA / "nifti" / "totalsegmentator_example"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe() -> PancreasPipeline:
    p = build_pipeline("pancreas-ct", None, device="cpu")
    assert isinstance(p, PancreasPipeline)
    return p


def _siemens() -> tuple[Volume, npt.NDArray[np.bool_]]:
    volume = load_series(sorted((SHARED_DATA / "dicom" / "ct_abdomen_siemens").glob("*.dcm")))
    seg = sitk.ReadImage(str(TS / "example_seg_dicom.nii.gz"))
    # Through the affine, never by index: the NIfTI's rows run the other way.
    on_grid = sitk.Resample(seg, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return volume, sitk.GetArrayFromImage(on_grid) == PANCREAS_LABEL


def _ts_example() -> tuple[sitk.Image, npt.NDArray[np.bool_]]:
    img = sitk.ReadImage(str(TS / "example_ct_sm.nii.gz"), sitk.sitkFloat32)
    seg = sitk.ReadImage(str(TS / "example_seg.nii.gz"))
    return img, sitk.GetArrayFromImage(seg) == PANCREAS_LABEL


SIEMENS = "siemens (seen by stage 1 only)"
CASES = {SIEMENS: _siemens, "totalsegmentator example (seen in training)": _ts_example}
_NOT_YET = pytest.mark.xfail(strict=True, reason=(
    "issue 16 open: CT stage 1 0.5.0-demo finds 1.0 ml of the Siemens series' 2.5 ml "
    "pancreas (Dice 0.23) and the anatomy check refuses the series"))


@pytest.fixture(scope="module", params=[pytest.param(k, id=k.split(" ")[0]) for k in CASES])
def analysed(request: pytest.FixtureRequest, pipe: PancreasPipeline) -> tuple[
        str, PancreasReport, npt.NDArray[np.bool_], tuple[float, float, float]]:
    source, ref = CASES[request.param]()
    report = pipe.report(source)
    img = source if isinstance(source, sitk.Image) else source.to_sitk()
    spacing = tuple(float(v) for v in img.GetSpacing())
    return request.param, report, ref, spacing  # type: ignore[return-value]


def _known_gap(request: pytest.FixtureRequest, name: str) -> None:
    if name == SIEMENS:
        request.applymarker(_NOT_YET)


def test_stage1_finds_the_real_pancreas(analysed: tuple[str, PancreasReport,
                                                        npt.NDArray[np.bool_], tuple],
                                        request: pytest.FixtureRequest) -> None:
    name, report, ref, _ = analysed
    _known_gap(request, name)
    assert ref.sum() > 500, name  # the label is there and mapped onto the grid
    assert report.pancreas_mask is not None, f"{name}: {report.summary()}"
    d = dice(report.pancreas_mask, ref)
    assert d >= 0.7, f"{name}: stage-1 Dice {d:.3f} with TotalSegmentator's pancreas"


def test_no_lesion_reported_away_from_the_real_pancreas(
        analysed: tuple[str, PancreasReport, npt.NDArray[np.bool_], tuple],
        pipe: PancreasPipeline) -> None:
    """Every reported lesion touches the labelled gland grown by the pipeline's margin."""
    name, report, ref, spacing = analysed
    margin = pipe.settings.lesion_margin_mm
    # Distance (mm) of every voxel to the labelled gland, on the source grid.
    dist = ndimage.distance_transform_edt(~ref, sampling=spacing[::-1])
    for les in report.lesions:
        assert les.mask is not None
        nearest = float(dist[les.mask].min())
        assert nearest <= margin, (
            f"{name}: {les.label} at confidence {les.confidence:.2f} lies {nearest:.0f} mm "
            f"from the labelled pancreas (margin {margin} mm)")


def test_a_real_abdominal_ct_is_judged(analysed: tuple[str, PancreasReport,
                                                      npt.NDArray[np.bool_], tuple],
                                       request: pytest.FixtureRequest) -> None:
    """Not refused: a real abdominal CT with a pancreas in it is what the models are for.

    Not yet on either: CT stage 2 (0.4.0-demo, trained on the first generator only)
    finds the TotalSegmentator CT outside its competence, and says so."""
    name, report, _, _ = analysed
    request.applymarker(pytest.mark.xfail(strict=True, reason=(
        "issue 16 open: CT stage 2 0.4.0-demo refuses real CT (competence check); "
        "the Siemens series fails the anatomy check")))
    assert report.not_assessable is None, f"{name}: {report.not_assessable}"


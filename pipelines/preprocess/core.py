"""The preprocessing machinery: steps, the composed pipeline, provenance and the inverse.

Every step is a small function of a SimpleITK image (which carries its own
physical grid), so the inverse needs no per-step bookkeeping: the source grid
and the output grid are both recorded in the provenance, and a prediction on
the output grid goes back by resampling it onto the source grid with the
identity transform. Geometric steps (reorient, resample, crop, resize) only
change the grid; intensity steps (window, z-score, N4, ...) never change it.
That split is what makes the inverse exact whenever the forward grid changes
are lossless (axis permutation/flip, crop, resampling to a grid no coarser
than the source).

The provenance is plain JSON (lists, floats, strings), stored on the job, so
a result can be reproduced and inverted later without the Python objects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from pipelines.preprocess.grids import Grid, grid_of, reference_image
from pipelines.volume import Volume
from storage.errors import GeometryError, PipelineError

__all__ = [
    "PROVENANCE_VERSION",
    "Context",
    "Preprocessor",
    "Provenance",
    "RoiBox",
    "Step",
]

log = logging.getLogger(__name__)

PROVENANCE_VERSION = 1
Provenance = dict[str, Any]


@dataclass(frozen=True)
class RoiBox:
    """A region of interest as an LPS bounding box in millimetres (corners, any order)."""

    lower_lps_mm: tuple[float, float, float]
    upper_lps_mm: tuple[float, float, float]

    @classmethod
    def from_mask(cls, mask: sitk.Image) -> RoiBox | None:
        """The physical box around a mask's non-zero voxels (voxel edges, not centres)."""
        array = sitk.GetArrayViewFromImage(mask)
        nz = np.nonzero(array)
        if len(nz[0]) == 0:
            return None
        lo = [float(np.min(a)) - 0.5 for a in nz]  # (z, y, x) continuous index
        hi = [float(np.max(a)) + 0.5 for a in nz]
        corners = [
            mask.TransformContinuousIndexToPhysicalPoint((x, y, z))
            for z in (lo[0], hi[0])
            for y in (lo[1], hi[1])
            for x in (lo[2], hi[2])
        ]
        pts = np.asarray(corners)
        low, high = pts.min(axis=0), pts.max(axis=0)
        return cls(
            (float(low[0]), float(low[1]), float(low[2])),
            (float(high[0]), float(high[1]), float(high[2])),
        )

    @classmethod
    def from_volume_mask(cls, volume: Volume, mask: npt.NDArray[Any]) -> RoiBox | None:
        """The box around a mask on the volume's source grid (e.g. a stage-1 pancreas mask)."""
        if mask.shape != volume.shape:
            raise GeometryError(f"mask shape {mask.shape} is not the volume's {volume.shape}")
        image = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        image.SetSpacing(volume.spacing)
        image.SetOrigin(volume.origin)
        image.SetDirection(volume.direction)
        return cls.from_mask(image)


@dataclass
class Context:
    """What a step may know besides the image: modality, an ROI, and its record.

    ``record`` is where a step writes what it did (window, crop box, statistics);
    the Preprocessor adds the grid before/after itself.
    """

    modality: str
    roi: RoiBox | None = None
    record: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Step(Protocol):
    """One declared preprocessing step. ``geometric`` steps may change the grid only."""

    @property
    def name(self) -> str: ...

    @property
    def geometric(self) -> bool: ...

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image: ...

    def params(self) -> dict[str, Any]: ...


def _same_grid(a: Grid, b: Grid) -> bool:
    return (
        list(a["size"]) == list(b["size"])
        and np.allclose(a["spacing"], b["spacing"], rtol=0, atol=1e-9)
        and np.allclose(a["origin"], b["origin"], rtol=0, atol=1e-6)
        and np.allclose(a["direction"], b["direction"], rtol=0, atol=1e-12)
    )


def _rounded(values: Sequence[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def _as_image_on(array_or_image: npt.NDArray[Any] | sitk.Image, grid: Grid) -> sitk.Image:
    """A prediction as an image on ``grid``; an array must have the grid's (z, y, x) shape."""
    if isinstance(array_or_image, sitk.Image):
        return array_or_image
    array = np.asarray(array_or_image)
    expected = tuple(reversed([int(v) for v in grid["size"]]))
    if array.shape != expected:
        raise GeometryError(
            f"prediction shape {array.shape} is not the preprocessed grid {expected} (z, y, x)"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(v) for v in grid["spacing"]])
    image.SetOrigin([float(v) for v in grid["origin"]])
    image.SetDirection([float(v) for v in grid["direction"]])
    return image


class Preprocessor:
    """Declared steps applied in order, recording each one; plus the exact way back."""

    def __init__(self, steps: Sequence[Step], *, name: str = "custom") -> None:
        self.steps = list(steps)
        self.name = name

    def describe(self) -> list[dict[str, Any]]:
        """The declared pipeline (names and parameters), before running it."""
        return [{"step": s.name, **s.params()} for s in self.steps]

    def forward(
        self, volume: Volume | sitk.Image, *, roi: RoiBox | None = None, modality: str = ""
    ) -> tuple[sitk.Image, Provenance]:
        """Preprocess a volume; the provenance holds everything the inverse needs.

        A SimpleITK image is accepted too (a job's stage inputs, training's NIfTI
        cases), with ``modality`` said by the caller. A failing step raises
        PipelineError("preprocess", ...) naming the step, so the job records
        where it failed.
        """
        if isinstance(volume, sitk.Image):
            image, series_uid = volume, None
        else:
            image, series_uid = volume.to_sitk(), volume.series_instance_uid
            modality = volume.modality
        source = grid_of(image)
        records: list[dict[str, Any]] = []
        for step in self.steps:
            ctx = Context(modality=modality, roi=roi)
            before = grid_of(image)
            started = time.perf_counter()
            try:
                out = step.forward(image, ctx)
            except PipelineError:
                raise
            except (RuntimeError, ValueError, GeometryError) as exc:
                raise PipelineError("preprocess", f"step {step.name} failed: {exc}") from exc
            after = grid_of(out)
            if not step.geometric and not _same_grid(before, after):
                raise PipelineError("preprocess", f"intensity step {step.name} changed the grid")
            entry: dict[str, Any] = {
                "step": step.name,
                "params": step.params(),
                "spacing_before": _rounded(before["spacing"]),
                "spacing_after": _rounded(after["spacing"]),
                "size_before": before["size"],
                "size_after": after["size"],
                **ctx.record,
                "seconds": round(time.perf_counter() - started, 4),
            }
            if step.geometric and not _same_grid(before, after):
                entry["grid_after"] = after
            records.append(entry)
            image = out
        provenance: Provenance = {
            "version": PROVENANCE_VERSION,
            "preprocessor": self.name,
            "series_instance_uid": series_uid,
            "modality": modality,
            "source_grid": source,
            "steps": records,
            "output_grid": grid_of(image),
        }
        log.debug("preprocessed", extra={"series_uid": series_uid, "preprocessor": self.name})
        return image, provenance

    @staticmethod
    def forward_label(label: npt.NDArray[Any] | sitk.Image, provenance: Provenance) -> sitk.Image:
        """A mask on the source grid taken through the same geometric steps (nearest).

        Replays every recorded grid change in order, the way the image went, so a
        reference mask can be compared with a prediction on the preprocessed grid.
        """
        image = _as_image_on(label, provenance["source_grid"])
        for entry in provenance["steps"]:
            grid = entry.get("grid_after")
            if grid is not None:
                image = sitk.Resample(
                    image, reference_image(grid), sitk.Transform(), sitk.sitkNearestNeighbor, 0
                )
        return image

    @staticmethod
    def invert_label(
        label: npt.NDArray[Any] | sitk.Image, provenance: Provenance
    ) -> npt.NDArray[np.uint8]:
        """A label on the preprocessed grid, back on the source grid as (slices, rows, cols).

        One nearest-neighbour resample from the output grid onto the source grid:
        slice k of the result is source slice k (``Volume.sop_instance_uids[k]``).
        Labels keep their values (multi-label maps stay multi-label).
        """
        image = _as_image_on(label, provenance["output_grid"])
        if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16):
            image = sitk.Cast(image, sitk.sitkUInt16)
        back = sitk.Resample(
            image,
            reference_image(provenance["source_grid"]),
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
        )
        return sitk.GetArrayFromImage(back).astype(np.uint8, copy=False)

    @staticmethod
    def invert_probability(
        probability: npt.NDArray[Any] | sitk.Image, provenance: Provenance
    ) -> npt.NDArray[np.float32]:
        """A probability map on the preprocessed grid, back on the source grid (linear).

        Better than inverting a thresholded label when the model grid is coarser
        than the source: threshold after the inverse, not before.
        """
        image = _as_image_on(probability, provenance["output_grid"])
        image = sitk.Cast(image, sitk.sitkFloat32)
        back = sitk.Resample(
            image,
            reference_image(provenance["source_grid"], sitk.sitkFloat32),
            sitk.Transform(),
            sitk.sitkLinear,
            0.0,
            sitk.sitkFloat32,
        )
        return sitk.GetArrayFromImage(back)

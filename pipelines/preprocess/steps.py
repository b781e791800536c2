"""The preprocessing steps: small, deterministic, each recording what it did.

Geometric steps keep the physical extent of the image (edge-aligned grids,
as MONAI's Spacing and nnU-Net do), so a mask resampled back lands where it
was drawn. Intensity steps never touch the grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813

from pipelines.preprocess.core import Context, RoiBox
from pipelines.preprocess.grids import (
    Grid,
    reference_image,
    resample_like,
    resample_to_grid,
    resample_to_spacing,
)
from pipelines.preprocess.intensity import intensity_preset, normalise
from storage.errors import PipelineError

__all__ = [
    "AdaptiveHistogramEqualisation",
    "ClipScale",
    "CropToRoi",
    "Intensity",
    "N4BiasCorrection",
    "Reorient",
    "ResampleToGrid",
    "ResampleToSpacing",
    "Resize2D",
    "Window",
    "ZScore",
    "crop_to_roi",
]


@dataclass(frozen=True)
class Reorient:
    """Permute/flip axes to a canonical orientation; lossless (no interpolation).

    ``axcodes`` uses SimpleITK's DICOMOrient convention: "LPS" gives an identity
    direction for an axial image (x to the left, y to posterior, z to superior).
    An oblique series stays oblique, only its axes are put in the closest order.
    """

    axcodes: str = "LPS"
    name: str = "reorient"
    geometric: bool = True

    def params(self) -> dict[str, Any]:
        return {"axcodes": self.axcodes}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        before = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            image.GetDirection()
        )
        ctx.record["orientation_before"] = before
        ctx.record["orientation_after"] = self.axcodes
        if before == self.axcodes:
            return image
        return sitk.DICOMOrient(image, self.axcodes)


@dataclass(frozen=True)
class ResampleToSpacing:
    """Resample to a target spacing (x, y, z) mm; ``None`` on an axis keeps that axis."""

    spacing: tuple[float | None, float | None, float | None]
    default: float | None = None  # value outside the source; None = the image minimum
    name: str = "resample"
    geometric: bool = True

    def params(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing), "default": self.default}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        old_spacing = image.GetSpacing()
        new_spacing = tuple(
            float(o) if t is None else float(t)
            for o, t in zip(old_spacing, self.spacing, strict=True)
        )
        if any(s <= 0 for s in new_spacing):
            raise PipelineError("preprocess", f"target spacing must be positive: {self.spacing}")
        default = self.default
        if default is None:
            default = float(sitk.GetArrayViewFromImage(image).min())
        ctx.record["default_value"] = default
        # Always resampled, even onto the same grid: that is what the shipped models
        # were trained on, and one code path cannot differ by a skipped no-op.
        return resample_to_spacing(image, new_spacing, default=default)


@dataclass(frozen=True)
class ResampleToGrid:
    """Resample onto a given grid (e.g. the stage-2 ROI grid a stage-1 mask defines)."""

    grid: Grid
    default: float = 0.0  # value outside the source
    name: str = "resample_to_grid"
    geometric: bool = True

    def params(self) -> dict[str, Any]:
        return {"grid": self.grid, "default": self.default}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        return resample_like(image, reference_image(self.grid), default=self.default)


@dataclass(frozen=True)
class Resize2D:
    """Resize every slice in-plane to (rows, cols) for 2D models; the physical extent is kept."""

    rows: int
    cols: int
    name: str = "resize2d"
    geometric: bool = True

    def params(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        nx, ny, nz = image.GetSize()
        sx, sy, sz = image.GetSpacing()
        if (nx, ny) == (self.cols, self.rows):
            return image
        spacing = (sx * nx / self.cols, sy * ny / self.rows, sz)
        default = float(sitk.GetArrayViewFromImage(image).min())
        return resample_to_grid(image, (self.cols, self.rows, nz), spacing, default=default)


@dataclass(frozen=True)
class CropToRoi:
    """Crop to a region of interest plus a margin in millimetres.

    The ROI is, in order: ``bbox_lps_mm`` given here, the context's ROI (e.g. a
    stage-1 pancreas mask), or the voxels at or above ``foreground_threshold``
    (e.g. -500 HU for the body). Without any ROI the step records that it was
    skipped and leaves the image alone: a missing ROI must not crop blindly.
    """

    margin_mm: float = 10.0
    bbox_lps_mm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    foreground_threshold: float | None = None
    name: str = "crop"
    geometric: bool = True

    def params(self) -> dict[str, Any]:
        return {
            "margin_mm": self.margin_mm,
            "bbox_lps_mm": None
            if self.bbox_lps_mm is None
            else [list(c) for c in self.bbox_lps_mm],
            "foreground_threshold": self.foreground_threshold,
        }

    def _roi(self, image: sitk.Image, ctx: Context) -> tuple[RoiBox | None, str]:
        if self.bbox_lps_mm is not None:
            return RoiBox(self.bbox_lps_mm[0], self.bbox_lps_mm[1]), "bbox"
        if ctx.roi is not None:
            return ctx.roi, "context"
        if self.foreground_threshold is not None:
            mask = sitk.BinaryThreshold(
                image, lowerThreshold=self.foreground_threshold, upperThreshold=1e30
            )
            return RoiBox.from_mask(mask), "foreground"
        return None, "none"

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        roi, source = self._roi(image, ctx)
        ctx.record["roi_source"] = source
        if roi is None:
            ctx.record["skipped"] = "no region of interest"
            return image
        lo = np.asarray(roi.lower_lps_mm) - self.margin_mm
        hi = np.asarray(roi.upper_lps_mm) + self.margin_mm
        corners = [
            image.TransformPhysicalPointToContinuousIndex((float(x), float(y), float(z)))
            for x in (lo[0], hi[0])
            for y in (lo[1], hi[1])
            for z in (lo[2], hi[2])
        ]
        idx = np.asarray(corners)
        size = np.asarray(image.GetSize())
        # Continuous index k covers [k-0.5, k+0.5]: keep every voxel the box touches.
        start = np.clip(np.floor(idx.min(axis=0) + 0.5).astype(int), 0, size - 1)
        stop = np.clip(np.ceil(idx.max(axis=0) - 0.5).astype(int) + 1, 1, size)
        ctx.record["roi_lps_mm"] = [
            [round(float(v), 3) for v in roi.lower_lps_mm],
            [round(float(v), 3) for v in roi.upper_lps_mm],
        ]
        if np.any(stop <= start):
            ctx.record["skipped"] = "region of interest outside the image"
            return image
        ctx.record["crop_index_start"] = [int(v) for v in start]  # (x, y, z)
        ctx.record["crop_index_stop"] = [int(v) for v in stop]
        return image[
            int(start[0]) : int(stop[0]), int(start[1]) : int(stop[1]), int(start[2]) : int(stop[2])
        ]


def crop_to_roi(
    roi: RoiBox | None = None, margin_mm: float = 10.0, *, foreground_threshold: float | None = None
) -> CropToRoi:
    """The crop step for an LPS box (or the context's ROI when ``roi`` is None)."""
    bbox = None if roi is None else (roi.lower_lps_mm, roi.upper_lps_mm)
    return CropToRoi(
        margin_mm=margin_mm, bbox_lps_mm=bbox, foreground_threshold=foreground_threshold
    )


@dataclass(frozen=True)
class Window:
    """CT windowing: clip to level +/- width/2 and scale to ``out_range``."""

    level: float
    width: float
    out_range: tuple[float, float] = (0.0, 1.0)
    name: str = "window"
    geometric: bool = False

    def params(self) -> dict[str, Any]:
        return asdict(self) | {"out_range": list(self.out_range)}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        if self.width <= 0:
            raise PipelineError("preprocess", f"window width must be positive: {self.width}")
        low, high = self.level - self.width / 2.0, self.level + self.width / 2.0
        ctx.record["window"] = {"level": self.level, "width": self.width, "low": low, "high": high}
        return _clip_scale(image, low, high, *self.out_range)


@dataclass(frozen=True)
class Intensity:
    """A named intensity preset (``pipelines.preprocess.intensity``): what models name.

    The maths of ``ct_pancreas``, ``mr_t1`` and ``ct_range`` are those the shipped
    models were trained with; this step is how every path applies them.
    """

    preset: str
    window: tuple[float, float] | None = None  # ct_range only: HU low, high
    name: str = "intensity"
    geometric: bool = False

    def __post_init__(self) -> None:
        spec = intensity_preset(self.preset)  # unknown names fail when declared, not per job
        if spec.needs_window and self.window is None:
            raise ValueError(f"intensity preset {self.preset} needs a window")

    def params(self) -> dict[str, Any]:
        return {"preset": self.preset,
                "window": None if self.window is None else list(self.window)}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        # A view, not a copy: normalise only reads it, and a fine CT grid is large.
        out = normalise(sitk.GetArrayViewFromImage(image), self.preset, self.window, ctx.record)
        result = sitk.GetImageFromArray(out)
        result.CopyInformation(image)
        return result


@dataclass(frozen=True)
class ClipScale:
    """Clip to [a_min, a_max] and scale linearly to [b_min, b_max]."""

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    name: str = "clip_scale"
    geometric: bool = False

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        if self.a_max <= self.a_min:
            raise PipelineError("preprocess", f"empty clip range [{self.a_min}, {self.a_max}]")
        return _clip_scale(image, self.a_min, self.a_max, self.b_min, self.b_max)


def _clip_scale(
    image: sitk.Image, low: float, high: float, b_min: float, b_max: float
) -> sitk.Image:
    # One ITK filter: no numpy round trip, so a 600 MB volume is not copied three times.
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.IntensityWindowing(image, low, high, b_min, b_max)


@dataclass(frozen=True)
class ZScore:
    """Subtract the mean and divide by the standard deviation.

    ``nonzero`` computes the statistics over voxels above zero only (MR
    background is air), and leaves background at zero, as nnU-Net does for MR.
    """

    nonzero: bool = True
    name: str = "zscore"
    geometric: bool = False

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        mask = array > 0 if self.nonzero else np.ones(array.shape, dtype=bool)
        values = array[mask]
        if values.size == 0:
            raise PipelineError("preprocess", "z-score: the image has no foreground voxels")
        mean, std = float(values.mean()), float(values.std())
        std = std if std > 1e-8 else 1.0
        ctx.record["mean"], ctx.record["std"] = round(mean, 6), round(std, 6)
        out = np.where(mask, (array - np.float32(mean)) / np.float32(std), 0).astype(np.float32)
        result = sitk.GetImageFromArray(out)
        result.CopyInformation(image)
        return result


@dataclass(frozen=True)
class N4BiasCorrection:
    """MR bias-field correction (SimpleITK N4), fitted on a shrunk copy for speed.

    The field is estimated on the image shrunk by ``shrink``, then evaluated
    on the full grid and divided out; the mask is the voxels above the mean.
    """

    shrink: int = 4
    iterations: tuple[int, ...] = (50, 50, 30)
    name: str = "n4"
    geometric: bool = False

    def params(self) -> dict[str, Any]:
        return {"shrink": self.shrink, "iterations": list(self.iterations)}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        image = sitk.Cast(image, sitk.sitkFloat32)
        array = sitk.GetArrayViewFromImage(image)
        offset = float(array.min())
        positive = image - offset + 1.0 if offset <= 0 else image
        # Foreground = above the mean: MR background is mostly air, so the mean falls
        # between air and tissue. (Otsu was tried: bright fat/vessel outliers push it
        # so high that the mask holds a handful of voxels and N4 fits nothing.)
        mask = sitk.Cast(
            positive > float(sitk.GetArrayViewFromImage(positive).mean()), sitk.sitkUInt8
        )
        factors = [self.shrink if n > 4 * self.shrink else 1 for n in image.GetSize()]
        small = sitk.Shrink(positive, factors)
        small_mask = sitk.Shrink(mask, factors)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(self.iterations))
        corrector.Execute(small, small_mask)
        log_field = corrector.GetLogBiasFieldAsImage(positive)
        corrected = positive / sitk.Exp(log_field)
        if offset <= 0:
            corrected = corrected + offset - 1.0
        ctx.record["shrink_factors"] = factors
        ctx.record["iterations_run"] = int(corrector.GetElapsedIterations())
        result = sitk.Cast(corrected, sitk.sitkFloat32)
        result.CopyInformation(image)
        return result


@dataclass(frozen=True)
class AdaptiveHistogramEqualisation:
    """Adaptive histogram equalisation per slice (SimpleITK), output rescaled to [0, 1].

    ``radius`` is in voxels (x, y); slices are equalised independently because
    2D models see one slice at a time and through-plane spacing differs.
    """

    alpha: float = 0.3
    beta: float = 0.3
    radius: tuple[int, int] = (16, 16)
    name: str = "clahe"
    geometric: bool = False

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "radius": list(self.radius)}

    def forward(self, image: sitk.Image, ctx: Context) -> sitk.Image:
        scaled = sitk.RescaleIntensity(sitk.Cast(image, sitk.sitkFloat32), 0.0, 1.0)
        out = sitk.AdaptiveHistogramEqualization(
            scaled, [self.radius[0], self.radius[1], 0], self.alpha, self.beta
        )
        result = sitk.Cast(out, sitk.sitkFloat32)
        result.CopyInformation(image)
        return result

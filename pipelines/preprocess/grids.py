"""Grids and resampling: the geometry every preprocessing path shares.

The shipped models were trained on inputs made by exactly these functions
(whole scan at the model spacing, the stage-2 ROI grid, the 2.5D stack), so
training, inference and the declared steps all resample through them; a
second implementation would drift by a rounding and change what the models see.
Arrays are (z, y, x); SimpleITK sizes and spacings are (x, y, z).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

__all__ = [
    "Grid",
    "grid_of",
    "pixels",
    "reference_image",
    "resample_like",
    "resample_to_grid",
    "resample_to_spacing",
    "roi_grid",
    "stack_25d",
]

Grid = dict[str, list[float] | list[int]]


def grid_of(image: sitk.Image) -> Grid:
    """An image's grid as JSON: size (x, y, z), spacing, origin, direction."""
    return {
        "size": [int(v) for v in image.GetSize()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def reference_image(grid: Grid, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
    """An empty image on a recorded grid, the target of a resample."""
    image = sitk.Image([int(v) for v in grid["size"]], pixel_id)
    image.SetSpacing([float(v) for v in grid["spacing"]])
    image.SetOrigin([float(v) for v in grid["origin"]])
    image.SetDirection([float(v) for v in grid["direction"]])
    return image


class _Owner:
    """An image's buffer as numpy sees it, holding the image while any array uses it."""

    def __init__(self, image: sitk.Image) -> None:
        view = sitk.GetArrayViewFromImage(image)  # makes the buffer this image's own
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: no one else holds it
        self.__array_interface__ = interface
        self._image = image


def pixels(image: sitk.Image) -> npt.NDArray[Any]:
    """The (z, y, x) pixels of an image the caller hands over, without a copy.

    For an image no one else uses (a resampling's output): ``GetArrayFromImage``
    would hold the image and its copy at once (twice a 300 MB source grid), and
    ``GetArrayViewFromImage`` is read-only and dies with the image. This array
    keeps the image alive and may be written; the caller must not use the image
    any more (nor an image sharing its buffer).
    """
    return np.asarray(_Owner(image))


def _grid(like: sitk.Image, spacing: Sequence[float] | npt.NDArray[np.float64],
          size: Sequence[int] | npt.NDArray[np.int64],
          origin: Sequence[float] | npt.NDArray[np.float64]) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection(like.GetDirection())
    return ref


def resample_like(img: sitk.Image, ref: sitk.Image, *, label: bool = False,
                  default: float = 0.0) -> sitk.Image:
    """``img`` on ``ref``'s grid: linear to float32 for images, nearest (same type) for labels."""
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out_type = img.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(img, ref, sitk.Transform(), interp, float(default), out_type)


def resample_to_grid(
    image: sitk.Image,
    size: Sequence[int],
    spacing: Sequence[float],
    *,
    label: bool = False,
    default: float = 0.0,
) -> sitk.Image:
    """Resample onto a grid of ``size`` and ``spacing`` with the same direction.

    The physical centre of the first voxel's outer edge stays where it was: the
    origin moves by half the change of spacing along each axis (as MONAI's
    Spacing and nnU-Net do), so a mask resampled back lands where it was drawn.
    """
    old_sp = np.array(image.GetSpacing())
    sp = np.array(spacing, dtype=float)
    d = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + d @ ((sp - old_sp) / 2.0)
    return resample_like(image, _grid(image, sp, size, origin), label=label, default=default)


def resample_to_spacing(img: sitk.Image, spacing: Sequence[float], *, label: bool = False,
                        default: float = 0.0) -> sitk.Image:
    """The whole image on a grid of ``spacing`` with the same direction and extent."""
    old_sp = np.array(img.GetSpacing())
    old_sz = np.array(img.GetSize())
    sp = np.array(spacing, dtype=float)
    size = np.maximum(1, np.round(old_sz * old_sp / sp)).astype(int)
    return resample_to_grid(img, [int(s) for s in size], [float(s) for s in sp], label=label,
                            default=default)


def roi_grid(
    mask: npt.NDArray[np.bool_],
    mask_img: sitk.Image,
    *,
    margin_mm: float,
    spacing: Sequence[float],
    min_size: Sequence[int] = (1, 1, 1),
    exact_xy: int | None = None,
) -> sitk.Image:
    """The stage-2 grid: bounding box of ``mask`` (on ``mask_img``'s grid) plus a
    margin in mm, at ``spacing`` (x, y, z), at least ``min_size`` voxels (x, y, z),
    centred on the box so a small gland still gets context all round."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("empty mask has no region of interest")
    lo = idx.min(0)[::-1].astype(float)  # (x, y, z) index
    hi = idx.max(0)[::-1].astype(float)
    sp_in = np.array(mask_img.GetSpacing())
    lo_mm = lo * sp_in - margin_mm
    hi_mm = hi * sp_in + margin_mm
    sp = np.array(spacing, dtype=float)
    size = np.maximum(np.ceil((hi_mm - lo_mm) / sp).astype(int) + 1, np.array(min_size))
    if exact_xy is not None:  # the slice classifier's fixed in-plane field
        size[0] = size[1] = exact_xy
    centre_mm = (lo_mm + hi_mm) / 2.0
    start_mm = centre_mm - (size - 1) * sp / 2.0
    d = np.array(mask_img.GetDirection()).reshape(3, 3)
    origin = np.array(mask_img.GetOrigin()) + d @ start_mm
    return _grid(mask_img, sp, size, origin)


def stack_25d(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(z, y, x) -> (z, 3, y, x): each slice with its neighbours (edges repeated)."""
    padded = np.concatenate([x[:1], x, x[-1:]], axis=0)
    return np.stack([padded[:-2], padded[1:-1], padded[2:]], axis=1).astype(np.float32)

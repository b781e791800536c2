"""Grids, resampling and intensity presets shared by training and inference.

Training and the node must see identical inputs, so the resampling to the
stage grids, the ROI grid and the intensity window live here, once.
Arrays are (z, y, x); SimpleITK sizes and spacings are (x, y, z).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

__all__ = [
    "normalise",
    "resample_like",
    "resample_to_spacing",
    "roi_grid",
    "stack_25d",
]


def normalise(arr: npt.NDArray, preset: str) -> npt.NDArray[np.float32]:
    """Network input intensities. CT: a fixed HU window (HU mean the same on every
    scanner); MR: robust per-volume scaling (T1 units are arbitrary)."""
    a = arr.astype(np.float32, copy=False)
    if preset.startswith("ct"):
        return np.clip((a + 200.0) / 550.0, 0.0, 1.0)
    if preset.startswith("mr"):
        fg = a[a > 0]
        hi = float(np.percentile(fg, 99.5)) if fg.size else 1.0
        return np.clip(a / max(hi, 1e-6), 0.0, 1.5)
    raise ValueError(f"unknown intensity preset {preset!r}")


def _grid(like: sitk.Image, spacing: Sequence[float] | npt.NDArray,
          size: Sequence[int] | npt.NDArray,
          origin: Sequence[float] | npt.NDArray) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection(like.GetDirection())
    return ref


def resample_to_spacing(img: sitk.Image, spacing: Sequence[float], *, label: bool = False,
                        default: float = 0.0) -> sitk.Image:
    """The whole image on a grid of ``spacing`` with the same direction and extent."""
    old_sp = np.array(img.GetSpacing())
    old_sz = np.array(img.GetSize())
    sp = np.array(spacing, dtype=float)
    size = np.maximum(1, np.round(old_sz * old_sp / sp)).astype(int)
    # Keep the physical centre fixed: origin shifts by half the voxel-size change.
    d = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin()) + d @ ((sp - old_sp) / 2.0)
    ref = _grid(img, sp, size, origin)
    return resample_like(img, ref, label=label, default=default)


def resample_like(img: sitk.Image, ref: sitk.Image, *, label: bool = False,
                  default: float = 0.0) -> sitk.Image:
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out_type = img.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(img, ref, sitk.Transform(), interp, float(default), out_type)


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

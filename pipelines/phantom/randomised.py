"""SynthSeg-style training images: label maps, deformed, with randomised appearance.

Why: the demo weights learnt what one generator draws (its intensities, its
noise, its one anatomy) and fire on anything else. A network trained on
images whose every appearance parameter is drawn afresh per case and per
structure can rely only on what stays fixed: the shape of the pancreas and
where it lies among its neighbours (Billot et al., SynthSeg, Med Image Anal
2023). Per case this module

1. takes a label map (``labelmaps.load_source``: the phantom generator's
   anatomy, the AMOS22 map or the TotalSegmentator example) and deforms it:
   a random affine (body size 0.85-1.2, small rotations) and a smooth random
   displacement field, so one real map gives many anatomies;
2. fills the unlabelled abdominal cavity of a real map with bowel loops and
   mesenteric fat, applies normal pancreas variants (atrophy, lobulated
   contour, fatty infiltration), inserts a lesion of the case's diagnosis
   into the pancreas (head / neck / body / tail, 5 mm up) and lookalikes
   outside it (fluid-filled bowel loops, vessels in cross-section, renal and
   hepatic cysts, calcifications);
3. paints every structure with a mean and texture drawn per case from the
   ranges of a CT contrast phase or an MR contrast (tables below), blurs for
   the acquisition (in-plane resolution 0.6-1 mm and kernel, slice thickness
   0.6-5 mm), adds a bias field (MR) and dose-dependent noise, crops a
   partial field of view and returns the case on the output grid.

Labels follow the Task07 convention the training and evaluation code read:
1 pancreas (including its duct and fatty parts), 2 lesion.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage
from scipy.special import expit

from pipelines.phantom.generator import _DIAG_P, DIAGNOSES
from pipelines.phantom.io import CASES_CSV_FIELDS, merge_cases_csv
from pipelines.phantom.labelmaps import (
    PANCREAS_CODES,
    STRUCTURES,
    LabelMap,
    code,
    load_source,
    real_sources_available,
)

__all__ = [
    "CT_PHASES",
    "MR_CONTRASTS",
    "SOURCES",
    "RandomisedCase",
    "RandomisedSpec",
    "add_lookalikes",
    "deform",
    "insert_lesion",
    "lesion_in_real_ct",
    "real_siemens_ct",
    "source_of",
    "synthesise",
    "write_randomised_dataset",
]

Source = Literal["generator", "amos", "totalseg", "mixed", "realct", "siemens"]
Modality = Literal["CT", "MR"]
SOURCES: tuple[str, ...] = ("generator", "amos", "totalseg")
CT_PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous")
MR_CONTRASTS: tuple[str, ...] = ("T1", "T2")
LOCATIONS: tuple[str, ...] = ("head", "neck", "body", "tail")
# Where along the gland (0 = head end, 1 = tail end) each location lies: the cut points
# of the generator and of inference (pipelines.phantom.generator._location_from_t).
_T_RANGE = {"head": (0.03, 0.3), "neck": (0.3, 0.4), "body": (0.4, 0.7), "tail": (0.7, 0.96)}
_LOC_P = np.array([0.5, 0.1, 0.22, 0.18])  # PDAC arises in the head in most series

# --- appearance tables -----------------------------------------------------------------
# CT mean HU ranges per phase. Sources: usual attenuation values of abdominal CT
# (non-contrast liver 50-65, spleen 40-50, pancreas 35-50; pancreatic/late-arterial
# phase ~40 s: aorta 250-450, pancreas peaks at 100-160, renal cortex 150-250, spleen
# heterogeneous; portal venous ~70 s: liver 100-130, portal vein 150-220, aorta
# 130-200). The ranges are deliberately wide: scanners, kVp, dose of contrast and
# timing all move them, and the network must not key on any one value.
_CT_COMMON: dict[str, tuple[float, float]] = {
    "background": (-1010.0, -990.0), "fat": (-125.0, -75.0), "muscle": (35.0, 65.0),
    "body": (20.0, 60.0), "bowel_fluid": (-5.0, 25.0), "bowel_gas": (-1000.0, -850.0),
    "gallbladder": (-5.0, 25.0), "bone": (180.0, 650.0), "spinal_canal": (0.0, 30.0),
    "lung": (-900.0, -750.0), "bladder": (-5.0, 20.0), "cyst": (-5.0, 20.0),
    "calcification": (250.0, 1100.0), "duct": (-5.0, 25.0), "viscera": (-110.0, -70.0),
}
_CT_PHASE: dict[str, dict[str, tuple[float, float]]] = {
    "non_contrast": {
        "liver": (45.0, 70.0), "spleen": (38.0, 55.0), "kidney": (25.0, 45.0),
        "stomach": (25.0, 50.0), "bowel": (25.0, 50.0), "aorta": (30.0, 55.0),
        "ivc": (30.0, 55.0), "portal_vein": (30.0, 55.0), "vessel_small": (30.0, 55.0),
        "adrenal": (20.0, 45.0), "pancreas": (30.0, 55.0),
    },
    "arterial": {
        "liver": (55.0, 95.0), "spleen": (85.0, 170.0), "kidney": (140.0, 260.0),
        "stomach": (50.0, 110.0), "bowel": (50.0, 110.0), "aorta": (230.0, 480.0),
        "ivc": (50.0, 150.0), "portal_vein": (90.0, 190.0), "vessel_small": (120.0, 380.0),
        "adrenal": (50.0, 100.0), "pancreas": (95.0, 165.0),
    },
    "portal_venous": {
        "liver": (95.0, 140.0), "spleen": (100.0, 140.0), "kidney": (140.0, 210.0),
        "stomach": (60.0, 110.0), "bowel": (60.0, 110.0), "aorta": (120.0, 210.0),
        "ivc": (100.0, 180.0), "portal_vein": (140.0, 230.0), "vessel_small": (120.0, 220.0),
        "adrenal": (50.0, 90.0), "pancreas": (85.0, 135.0),
    },
}
# MR signal relative to the brightest tissue (arbitrary units, scaled per case).
# T1 (gradient echo, with or without fat suppression): the pancreas is the brightest
# organ, fluid dark. T2 (fast spin echo): fluid brightest, liver and muscle dark.
_MR_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "T1": {
        "background": (0.0, 0.01), "fat": (0.8, 1.0), "muscle": (0.22, 0.35),
        "body": (0.25, 0.45), "liver": (0.42, 0.65), "spleen": (0.28, 0.45),
        "kidney": (0.28, 0.48), "stomach": (0.25, 0.45), "bowel": (0.25, 0.45),
        "bowel_fluid": (0.04, 0.15), "bowel_gas": (0.0, 0.03), "gallbladder": (0.04, 0.2),
        "aorta": (0.02, 0.4), "ivc": (0.05, 0.4), "portal_vein": (0.05, 0.4),
        "vessel_small": (0.02, 0.4), "bone": (0.45, 0.8), "spinal_canal": (0.04, 0.14),
        "lung": (0.0, 0.05), "adrenal": (0.28, 0.42), "bladder": (0.03, 0.12),
        "pancreas": (0.5, 0.8), "duct": (0.04, 0.15), "cyst": (0.03, 0.14),
        "calcification": (0.0, 0.05), "viscera": (0.8, 1.0),
    },
    "T2": {
        "background": (0.0, 0.01), "fat": (0.55, 0.9), "muscle": (0.08, 0.18),
        "body": (0.15, 0.3), "liver": (0.12, 0.25), "spleen": (0.35, 0.55),
        "kidney": (0.35, 0.6), "stomach": (0.2, 0.35), "bowel": (0.2, 0.35),
        "bowel_fluid": (0.75, 1.0), "bowel_gas": (0.0, 0.03), "gallbladder": (0.8, 1.0),
        "aorta": (0.01, 0.12), "ivc": (0.02, 0.3), "portal_vein": (0.02, 0.3),
        "vessel_small": (0.01, 0.2), "bone": (0.3, 0.6), "spinal_canal": (0.85, 1.0),
        "lung": (0.0, 0.04), "adrenal": (0.2, 0.35), "bladder": (0.85, 1.0),
        "pancreas": (0.22, 0.4), "duct": (0.8, 1.0), "cyst": (0.85, 1.0),
        "calcification": (0.0, 0.04), "viscera": (0.55, 0.9),
    },
}
# Texture (sd of a smooth field within the structure): CT in HU, MR as a fraction of
# the structure's mean. The spleen's arterial-phase arciform pattern and the renal
# cortico-medullary difference are strong textures; fluid is flat.
_TEX_CT = {"spleen": (4.0, 30.0), "kidney": (5.0, 40.0), "bone": (30.0, 120.0),
           "bowel": (5.0, 25.0), "stomach": (5.0, 20.0), "fat": (3.0, 12.0),
           "pancreas": (3.0, 15.0), "lung": (10.0, 40.0)}
_FLAT = ("bowel_fluid", "gallbladder", "cyst", "bladder", "duct", "spinal_canal",
         "background", "bowel_gas")


@dataclass(frozen=True, slots=True)
class RandomisedSpec:
    """What to synthesise; every random choice comes from ``seed``."""

    seed: int
    source: Source = "mixed"
    modality: Modality = "CT"
    contrast: str | None = None  # a CT phase / MR contrast; None: drawn
    diagnosis: str | None = None  # None: the generator's case mix
    lesion_diameter_mm: float | None = None  # None: 5..40 mm, small ones more often
    spacing: tuple[float, float, float] | None = None  # output (x, y, z) mm; None: drawn


@dataclass(slots=True)
class RandomisedCase:
    image: npt.NDArray[np.float32]  # (z, y, x) HU (CT) or arbitrary units (MR)
    label: npt.NDArray[np.uint8]  # 0 background, 1 pancreas, 2 lesion (Task07)
    tissue: npt.NDArray[np.uint8]  # codes of labelmaps.STRUCTURES on the same grid
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]
    diagnosis: str
    lesion_diameter_mm: float | None
    lesion_location: str | None
    source: str
    modality: str
    contrast: str
    intensities: dict[str, float]  # the mean drawn for each structure present
    lookalikes: list[dict[str, Any]] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    meta: dict[str, float] = field(default_factory=dict)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# --- random fields -------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...],
                  sigma_vox: float) -> npt.NDArray[np.float32]:
    """Zero-mean, unit-sd smooth random field; drawn on a coarser grid when smooth
    enough (cost), then interpolated to ``shape``."""
    f = max(1, int(sigma_vox // 2))
    small = tuple(max(2, math.ceil(s / f)) for s in shape)
    g = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32),
                                max(sigma_vox / f, 0.5), mode="wrap")
    if f > 1:
        g = _resize(g, shape, order=1)
    g -= g.mean()
    return g / (float(g.std()) or 1.0)


def _interp_matrix(n_out: int, n_in: int) -> npt.NDArray[np.float32]:
    """Linear interpolation from ``n_in`` to ``n_out`` samples (end points aligned)."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - i0
    w = np.zeros((n_out, n_in), np.float32)
    w[np.arange(n_out), i0] = 1.0 - frac
    if n_in > 1:
        w[np.arange(n_out), i0 + 1] += frac
    return w


def _resize(a: npt.NDArray[Any], shape: tuple[int, ...], order: int = 1) -> npt.NDArray[Any]:
    """Separable linear upsampling of a small 3-D array (three small matrix products:
    far cheaper than ``ndimage.zoom`` on the full grid)."""
    wz, wy, wx = (_interp_matrix(t, s) for t, s in zip(shape, a.shape, strict=True))
    out = np.tensordot(a.astype(np.float32), wx, axes=([2], [1]))  # (z', y', x)
    out = np.tensordot(out, wy, axes=([1], [1]))  # (z', x, y)
    out = np.tensordot(wz, out, axes=([1], [0]))  # (z, x, y)
    return np.ascontiguousarray(out.transpose(0, 2, 1))


# --- deformation -----------------------------------------------------------------------


def _rotation(rx: float, ry: float, rz: float) -> npt.NDArray[np.float64]:
    cx, sx, cy, sy, cz, sz = (math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry),
                              math.cos(rz), math.sin(rz))
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _voxels_mm(m: LabelMap, mask: npt.NDArray[np.bool_], step: int = 1) -> npt.NDArray:
    idx = np.argwhere(mask)[::step]
    return np.asarray(m.origin) + idx[:, ::-1] * np.asarray(m.spacing)  # (n, xyz)


def deform(
    src: LabelMap,
    rng: np.random.Generator,
    *,
    spacing: tuple[float, float, float],
    strength: float = 1.0,
    partial_fov: bool = True,
) -> tuple[LabelMap, dict[str, float]]:
    """``src`` through a random affine and a smooth displacement field, on a grid of
    ``spacing`` that covers the body (or a random part of it that keeps the pancreas).

    Nearest-neighbour pull from the source, slab by slab (memory). The output frame
    is centred on the source's pancreas, so its position in the field of view moves
    only with the crop.
    """
    scale_xy = float(np.clip(np.exp(rng.normal(0.0, 0.1 * strength)), 0.85, 1.2))
    aspect = float(np.clip(np.exp(rng.normal(0.0, 0.05 * strength)), 0.9, 1.1))
    scale_z = float(np.clip(np.exp(rng.normal(0.0, 0.06 * strength)), 0.88, 1.12))
    rot = rng.normal(0.0, 1.0, 3) * np.deg2rad([3.0, 3.0, 6.0]) * strength
    a_fwd = _rotation(*rot) @ np.diag([scale_xy * aspect, scale_xy / aspect, scale_z])
    a_inv = np.linalg.inv(a_fwd)
    panc = src.pancreas()
    if not panc.any():
        raise ValueError("label map has no pancreas")
    c_src = _voxels_mm(src, panc).mean(0)
    body = src.codes > 0
    pts = [(_voxels_mm(src, panc) - c_src) @ a_fwd.T,
           (_voxels_mm(src, body, step=11) - c_src) @ a_fwd.T]
    p_lo, p_hi = pts[0].min(0) - 8.0, pts[0].max(0) + 8.0
    b_lo, b_hi = pts[1].min(0) - 6.0, pts[1].max(0) + 6.0
    lo, hi = b_lo.copy(), b_hi.copy()
    if partial_fov:
        # z: random reach above and below the gland, never past the source's coverage.
        lo[2] = max(b_lo[2], p_lo[2] - float(rng.uniform(15.0, 160.0)))
        hi[2] = min(b_hi[2], p_hi[2] + float(rng.uniform(15.0, 160.0)))
        for d in (0, 1):  # in-plane: sometimes the field of view cuts the body
            if rng.random() < 0.2:
                lo[d] = float(rng.uniform(b_lo[d], min(b_lo[d] + 0.5 * (p_lo[d] - b_lo[d]),
                                                        p_lo[d] - 25.0)))
            if rng.random() < 0.2:
                hi[d] = float(rng.uniform(max(b_hi[d] - 0.5 * (b_hi[d] - p_hi[d]),
                                              p_hi[d] + 25.0), b_hi[d]))
    lo, hi = np.minimum(lo, p_lo), np.maximum(hi, p_hi)
    sp = np.asarray(spacing, float)
    n = np.maximum(np.ceil((hi - lo) / sp).astype(int) + 1, 4)  # x, y, z
    shape = (int(n[2]), int(n[1]), int(n[0]))
    # Displacement field: control points every ~45 mm, sd up to 5 mm.
    amp = float(rng.uniform(2.0, 5.0)) * strength
    ctrl = tuple(max(3, math.ceil(s * float(g) / 45.0) + 1)
                 for s, g in zip(shape, (sp[2], sp[1], sp[0]), strict=True))
    # Smooth at the control grid, then interpolated separably per slab (cheap).
    coarse = [ndimage.gaussian_filter(rng.normal(0.0, amp, ctrl), 0.7, mode="nearest")
              * math.sqrt(2.0) for _ in range(3)]
    wz, wy, wx = (_interp_matrix(t, s) for t, s in zip(shape, ctrl, strict=True))
    cxy = [np.tensordot(np.tensordot(c, wx, axes=([2], [1])), wy, axes=([1], [1]))
           for c in coarse]  # (ctrl_z, x, y)
    out = np.zeros(shape, np.uint8)
    ys_i, xs_i = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    src_org, src_sp = np.asarray(src.origin), np.asarray(src.spacing)
    slab = max(1, 400_000 // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], slab):
        zi = np.arange(z0, min(shape[0], z0 + slab))
        zz = np.broadcast_to(zi[:, None, None], (len(zi), *ys_i.shape)).ravel()
        yy = np.broadcast_to(ys_i, (len(zi), *ys_i.shape)).ravel()
        xx = np.broadcast_to(xs_i, (len(zi), *xs_i.shape)).ravel()
        disp = np.stack([np.tensordot(wz[zi], c, axes=([1], [0])).transpose(0, 2, 1).ravel()
                         for c in cxy], 1)
        p = lo + np.stack([xx, yy, zz], 1) * sp  # output mm (x, y, z), pancreas-centred
        q = c_src + (p + disp) @ a_inv.T
        qi = (q - src_org) / src_sp
        out[zi[0]:zi[-1] + 1] = ndimage.map_coordinates(
            src.codes, [qi[:, 2], qi[:, 1], qi[:, 0]], order=0, mode="constant", cval=0,
        ).reshape(len(zi), shape[1], shape[2])
    info = {"scale_xy": scale_xy, "aspect": aspect, "scale_z": scale_z,
            "rot_z_deg": float(np.rad2deg(rot[2])), "elastic_sd_mm": amp}
    return LabelMap(out, (float(sp[0]), float(sp[1]), float(sp[2])),
                    (float(lo[0]), float(lo[1]), float(lo[2]))), info


# --- label edits ---------------------------------------------------------------------


def _fill_viscera(m: LabelMap, rng: np.random.Generator) -> None:
    """The unlabelled cavity of a real map: bowel loops (wall, fluid, gas) in fat."""
    c = m.codes
    vis = c == code("viscera")
    if not vis.any():
        return
    sx = m.spacing[0]
    f = _smooth_field(rng, c.shape, 7.0 / sx)
    loops = vis & (f > float(rng.uniform(-0.1, 0.6)))
    inner = ndimage.binary_erosion(loops, iterations=max(1, round(2.5 / sx)))
    g = _smooth_field(rng, c.shape, 10.0 / sx)
    c[vis] = code("fat")
    c[loops] = code("bowel")
    c[inner & (g > 0.3)] = code("bowel_fluid")
    c[inner & (g < -1.0)] = code("bowel_gas")


def _gland_axis(m: LabelMap, gland: npt.NDArray[np.bool_]) -> tuple[npt.NDArray, npt.NDArray,
                                                                     npt.NDArray]:
    """Gland voxels, their position t along the gland (0 head .. 1 tail) and a centreline."""
    idx = np.argwhere(gland)
    mm = np.asarray(m.origin) + idx[:, ::-1] * np.asarray(m.spacing)
    c = mm.mean(0)
    _, _, vt = np.linalg.svd(mm - c, full_matrices=False)
    ax = vt[0] if vt[0][0] >= 0 else -vt[0]  # the tail is to the patient's left (+x)
    proj = (mm - c) @ ax
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    bins = np.clip((t * 16).astype(int), 0, 15)
    line = np.array([mm[bins == b].mean(0) for b in range(16) if (bins == b).any()])
    return idx, t, line


def _ball(shape: tuple[int, ...], m: LabelMap, centre: npt.NDArray, r: float
          ) -> tuple[tuple[slice, ...], npt.NDArray[np.float32]]:
    """The box around a ball and each box voxel's distance (mm) from the centre."""
    sp = np.asarray(m.spacing)[::-1]  # z, y, x
    cz = (centre[::-1] - np.asarray(m.origin)[::-1]) / sp
    lim = np.asarray(shape)
    lo = np.clip(np.floor(cz - r / sp - 1).astype(int), 0, lim)
    hi = np.maximum(np.clip(np.ceil(cz + r / sp + 2).astype(int), 0, lim), lo)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*[(np.arange(a, b) - c0) * s for a, b, c0, s
                          in zip(lo, hi, cz, sp, strict=True)], indexing="ij")
    d = np.sqrt(sum(g * g for g in grids)).astype(np.float32)
    return sl, d


def apply_variants(m: LabelMap, rng: np.random.Generator) -> list[str]:
    """Normal pancreas variants: atrophy, lobulated contour, fatty infiltration."""
    c = m.codes
    out: list[str] = []
    gland = np.isin(c, PANCREAS_CODES)
    sx = m.spacing[0]
    if rng.random() < 0.15 and gland.sum() > 400:
        er = ndimage.binary_erosion(gland, iterations=1)
        lab, n = ndimage.label(er)
        if n >= 1:
            sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
            keep = lab == 1 + int(np.argmax(sizes))
            if keep.sum() > 0.45 * gland.sum():
                c[gland & ~keep] = code("fat")
                gland = keep
                out.append("atrophy")
    if rng.random() < 0.3:
        f = _smooth_field(rng, c.shape, 2.0 / sx)
        shell_in = gland & ~ndimage.binary_erosion(gland)
        shell_out = ndimage.binary_dilation(gland) & ~gland & np.isin(
            c, (code("fat"), code("body"), code("viscera")))
        c[shell_in & (f > 0.8)] = code("fat")
        c[shell_out & (f < -0.8)] = code("pancreas")
        gland = np.isin(c, PANCREAS_CODES)
        lab, n = ndimage.label(gland)
        if n > 1:  # keep one gland: stray islands go back to fat
            sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
            c[gland & (lab != 1 + int(np.argmax(sizes)))] = code("fat")
        out.append("lobulated")
    if rng.random() < 0.3:
        f = _smooth_field(rng, c.shape, 2.5 / sx)
        frac = float(rng.uniform(0.1, 0.45))
        thr = float(np.quantile(f[gland], 1.0 - frac)) if gland.any() else 9.0
        c[(c == code("pancreas")) & (f > thr)] = code("pancreas_fat")
        out.append("fatty_infiltration")
    return out


def insert_lesion(
    m: LabelMap,
    rng: np.random.Generator,
    diagnosis: str,
    *,
    diameter_mm: float | None = None,
    location: str | None = None,
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """A lesion of ``diagnosis`` in the pancreas of ``m`` (edited in place).

    Returns the lesion weight (0..1, soft at a PDAC's ill-defined margin; the label
    is where it is >= 0.5) and what was drawn. The lesion may bulge at most
    ``bulge_mm`` beyond the gland contour (tumours expand it), never further.
    Rules: PDAC irregular, soft-edged, with upstream duct dilation; PNET round and
    sharp; IPMN multilocular cyst with a dilated duct; other benign: unilocular
    cyst (3 in 4) or a small solid, well-defined nodule.
    """
    c = m.codes
    gland = np.isin(c, PANCREAS_CODES)
    idx, t, line = _gland_axis(m, gland)
    loc = location or str(rng.choice(LOCATIONS, p=_LOC_P))
    t0, t1 = _T_RANGE[loc]
    sel = (t >= t0) & (t < t1)
    if not sel.any():
        sel = np.ones(len(t), bool)
    edt = ndimage.distance_transform_edt(gland, sampling=m.spacing[::-1])
    depth = edt[tuple(idx[sel].T)]
    cand = idx[sel][depth >= 0.6 * depth.max()]
    pick = cand[int(rng.integers(len(cand)))]
    centre = np.asarray(m.origin) + pick[::-1] * np.asarray(m.spacing)
    tl = float(t[sel][int(np.argmin(np.abs(idx[sel] - pick).sum(1)))])
    diam = float(diameter_mm) if diameter_mm else float(np.exp(rng.uniform(math.log(5.0),
                                                                          math.log(40.0))))
    r = diam / 2.0
    bulge = min(0.3 * diam, 6.0)
    sl, dc = _ball(c.shape, m, centre, r * 1.6 + 6.0)
    sub_gland = gland[sl]
    out_d = ndimage.distance_transform_edt(~sub_gland, sampling=m.spacing[::-1])
    allowed = out_d <= bulge
    kind = diagnosis
    if diagnosis == "PDAC":
        irr = _smooth_field(rng, dc.shape, 2.0 / m.spacing[0])
        edge = float(rng.uniform(0.8, 2.2))
        w = expit((r * (1.0 + 0.2 * irr) - dc) / edge)
    elif diagnosis == "PNET":
        w = expit((r - dc) / 0.35)
    elif diagnosis == "IPMN":
        w = np.zeros(dc.shape)
        zyx = np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij")
        for _ in range(int(rng.integers(2, 5))):
            off = rng.uniform(-0.45, 0.45, 3) * r
            cc = centre + off
            cz = (cc[::-1] - np.asarray(m.origin)[::-1]) / np.asarray(m.spacing)[::-1]
            dd = np.sqrt(sum(((g - c0) * s) ** 2 for g, c0, s
                             in zip(zyx, cz, np.asarray(m.spacing)[::-1], strict=True)))
            rr = r * float(rng.uniform(0.45, 0.7))
            w = np.maximum(w, expit((rr - dd) / 0.35))
    else:
        kind = "other_benign_cyst" if rng.random() < 0.75 else "other_benign_solid"
        w = expit((r - dc) / 0.35)
    w = (w * allowed).astype(np.float32)
    w[w < 1e-3] = 0.0  # the sigmoid's far tail: no lesion there, leave the image alone
    lesion = w >= 0.5
    if not lesion.any():  # too small for the grid: keep the centre voxel
        k = np.unravel_index(int(np.argmax(np.where(sub_gland, dc.max() - dc, -1))), dc.shape)
        lesion[k] = True
        w[k] = 1.0
    # One lesion is one object: keep the component at the centre (the largest).
    lab, n = ndimage.label(lesion)
    if n > 1:
        sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
        keep = lab == 1 + int(np.argmax(sizes))
        w[lesion & ~keep] = np.minimum(w[lesion & ~keep], 0.49)
        lesion = keep
    sub = c[sl]
    sub[lesion] = code("lesion")
    # Duct: dilated upstream of a PDAC, throughout in IPMN; thin (or invisible) otherwise.
    if diagnosis == "PDAC":
        _duct(m, line, float(rng.uniform(1.5, 3.5)), t_from=tl, t_dir=+1)
    elif diagnosis == "IPMN":
        _duct(m, line, float(rng.uniform(1.2, 2.5)), t_from=0.0, t_dir=+1)
    full = np.zeros(c.shape, np.float32)
    full[sl] = w
    info = {"diameter_mm": diam, "location": loc, "kind": kind,
            "centre_mm": [float(v) for v in centre], "bulge_mm": bulge}
    return full, info


def _duct(m: LabelMap, line: npt.NDArray, radius: float, *, t_from: float, t_dir: int) -> None:
    """The main duct along the centreline from ``t_from`` towards the tail, in the gland."""
    c = m.codes
    n = len(line)
    k0 = round(t_from * (n - 1))
    pts = line[k0:] if t_dir > 0 else line[:k0 + 1]
    if len(pts) < 2:
        return
    dense = np.concatenate([np.linspace(a, b, 6, endpoint=False) for a, b
                            in itertools.pairwise(pts)] + [pts[-1:]])
    for p in dense:
        sl, d = _ball(c.shape, m, p, radius + 1.0)
        sub = c[sl]
        sub[(d <= radius) & (sub == code("pancreas"))] = code("duct")


def add_lookalikes(m: LabelMap, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Structures that look like lesions but are not in the pancreas: fluid-filled
    bowel loops and vessels in cross-section beside it, renal and hepatic cysts,
    calcifications. None comes within 2 mm of the gland."""
    c = m.codes
    panc = np.isin(c, (*PANCREAS_CODES, code("lesion")))
    keep_out = ndimage.binary_dilation(panc, iterations=max(1, math.ceil(2.0 / m.spacing[0])))
    pc = _voxels_mm(m, panc).mean(0)
    made: list[dict[str, Any]] = []
    inside = c > 0

    def place(where: npt.NDArray[np.bool_], r: float, value: str, kind: str,
              wall: str | None = None) -> None:
        cand = np.argwhere(where & ~keep_out)
        if not len(cand):
            return
        pick = cand[int(rng.integers(len(cand)))]
        centre = np.asarray(m.origin) + pick[::-1] * np.asarray(m.spacing)
        sl, d = _ball(c.shape, m, centre, r + 3.0)
        sub, ko, ins = c[sl], keep_out[sl], inside[sl]
        if wall is not None:
            sub[(d <= r + 2.0) & ~ko & ins] = code(wall)
        sub[(d <= r) & ~ko & ins] = code(value)
        made.append({"kind": kind, "diameter_mm": 2 * r,
                     "centre_mm": [float(v) for v in centre]})

    near = np.zeros(c.shape, bool)
    sl, d = _ball(c.shape, m, pc, 70.0)
    near[sl] = d <= 70.0
    soft = np.isin(c, (code("fat"), code("body"), code("bowel")))
    for _ in range(int(rng.integers(1, 4))):  # fluid-filled bowel loops near the gland
        place(soft & near, float(rng.uniform(5.0, 15.0)), "bowel_fluid", "bowel_loop",
              wall="bowel")
    for _ in range(int(rng.integers(0, 3))):
        place(c == code("kidney"), float(rng.uniform(2.5, 14.0)), "cyst", "renal_cyst")
    for _ in range(int(rng.integers(0, 3))):
        place(c == code("liver"), float(rng.uniform(2.5, 12.0)), "cyst", "hepatic_cyst")
    for _ in range(int(rng.integers(1, 5))):  # vessels in cross-section: short z-tubes
        cand = np.argwhere(soft & near & ~keep_out)
        if not len(cand):
            break
        pick = cand[int(rng.integers(len(cand)))]
        r = float(rng.uniform(1.5, 4.5))
        length = float(rng.uniform(20.0, 70.0))
        tilt = rng.normal(0.0, 0.25, 2)
        centre = np.asarray(m.origin) + pick[::-1] * np.asarray(m.spacing)
        for s in np.arange(-length / 2, length / 2, m.spacing[2]):
            p = centre + np.array([tilt[0] * s, tilt[1] * s, s])
            sl, d = _ball(c.shape, m, p, r + 1.0)
            sub, ko = c[sl], keep_out[sl]
            sub[(d <= r) & ~ko & np.isin(sub, (code("fat"), code("body"), code("bowel")))] = \
                code("vessel_small")
        made.append({"kind": "vessel", "diameter_mm": 2 * r,
                     "centre_mm": [float(v) for v in centre]})
    aorta_wall = (c == code("aorta")) & ~ndimage.binary_erosion(c == code("aorta"))
    for _ in range(int(rng.integers(1, 6))):
        where = aorta_wall if rng.random() < 0.5 else (soft & near)
        place(where, float(rng.uniform(0.8, 2.5)), "calcification", "calcification")
    return made


# --- appearance --------------------------------------------------------------------


def _lesion_mean(rng: np.random.Generator, ct: bool, contrast: str, diagnosis: str,
                 kind: str, p: float, fluid: float) -> float:
    """The lesion's mean from its type's rule, relative to the pancreas ``p`` (and to
    fluid for the cystic types), for a CT phase or an MR contrast."""
    if diagnosis == "PDAC":  # hypo-attenuating (CT), hypo T1, iso-mildly hyper T2
        les = (p - float(rng.uniform(25.0, 80.0)) if contrast != "non_contrast"
               else p - float(rng.uniform(5.0, 25.0))) if ct else \
            (p * float(rng.uniform(0.45, 0.75)) if contrast == "T1"
             else p * float(rng.uniform(1.05, 1.5)))
    elif diagnosis == "PNET":  # hyper-enhancing (arterial most), hypo T1, bright T2
        les = (p + {"arterial": float(rng.uniform(40.0, 120.0)),
                    "portal_venous": float(rng.uniform(20.0, 60.0)),
                    "non_contrast": float(rng.uniform(-8.0, 5.0))}[contrast]) if ct else \
            (p * float(rng.uniform(0.4, 0.7)) if contrast == "T1"
             else p * float(rng.uniform(1.6, 2.6)))
    elif diagnosis == "IPMN" or kind == "other_benign_cyst":
        les = fluid + (float(rng.uniform(0.0, 12.0)) if ct else 0.0)
    else:  # solid benign or normal (unused)
        les = (p - float(rng.uniform(10.0, 40.0))) if ct else \
            (p * float(rng.uniform(0.6, 0.85)) if contrast == "T1"
             else p * float(rng.uniform(1.2, 2.0)))
    return float(les)


# What stays where physics puts it: air, gas, lung, fat, bone and calcium.
_FIXED_CT = frozenset({"background", "bowel_gas", "lung", "fat", "viscera", "bone",
                       "calcification"})


def _draw_intensities(rng: np.random.Generator, modality: str, contrast: str,
                      diagnosis: str, lesion_kind: str) -> tuple[dict[str, float],
                                                                  dict[str, float]]:
    """Per-structure means and texture sds for one case."""
    table = {**_CT_COMMON, **_CT_PHASE[contrast]} if modality == "CT" else dict(_MR_TABLE[contrast])
    mean = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in sorted(table.items())}
    if modality == "MR" and rng.random() < 0.5:  # fat suppression
        for k in ("fat", "viscera", "bone"):
            mean[k] *= float(rng.uniform(0.08, 0.3))
    if modality == "CT" and rng.random() < 0.5:
        # Off the tables: real scans fall outside any table (a fatty gland at -10 HU on
        # the TotalSegmentator example, 65 HU on a venous-phase Siemens series, between
        # the non-contrast and portal-venous ranges). Half the cases move every soft
        # tissue by its own offset and draw the pancreas from the whole range, so no
        # network can key on a value, only on shape and place (SynthSeg's idea).
        for k in mean:
            if k not in _FIXED_CT:
                mean[k] += float(rng.uniform(-40.0, 40.0))
        mean["pancreas"] = float(rng.uniform(-25.0, 175.0))
    mean["viscera"] = mean["fat"]
    # Fatty-infiltrated parts of the gland sit between pancreas and fat.
    mix = float(rng.uniform(0.4, 0.9))
    mean["pancreas_fat"] = (1 - mix) * mean["pancreas"] + mix * mean["fat"]
    ct = modality == "CT"
    mean["lesion"] = _lesion_mean(rng, ct, contrast, diagnosis, lesion_kind,
                                  mean["pancreas"], mean["cyst"])
    tex: dict[str, float] = {}
    for k, m in mean.items():
        if k in _FLAT:
            tex[k] = float(rng.uniform(0.0, 2.0)) if ct else float(rng.uniform(0.0, 0.02)) * m
        elif ct:
            lo, hi = _TEX_CT.get(k, (3.0, 12.0))
            if k in ("spleen", "kidney") and contrast != "arterial":
                hi = lo + 0.4 * (hi - lo)
            tex[k] = float(rng.uniform(lo, hi))
        else:
            tex[k] = float(rng.uniform(0.02, 0.1)) * m
    return mean, tex


def _render(m: LabelMap, w_lesion: npt.NDArray[np.float32], mean: dict[str, float],
            tex: dict[str, float], rng: np.random.Generator) -> npt.NDArray[np.float32]:
    n = len(STRUCTURES)
    lut_m = np.zeros(n, np.float32)
    lut_s = np.zeros(n, np.float32)
    lut_w = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    lut_w /= np.sqrt((lut_w**2).sum(1, keepdims=True))
    for i, name in enumerate(STRUCTURES):
        lut_m[i] = mean.get(name, mean["body"])
        lut_s[i] = tex.get(name, 0.0)
    sx = m.spacing[0]
    fields = [_smooth_field(rng, m.codes.shape, s / sx) for s in (0.8, 2.0, 5.0)]
    c = m.codes
    tx = sum(lut_w[c, j] * fields[j] for j in range(3))
    img = lut_m[c] + lut_s[c] * tx
    if w_lesion.any():
        les = np.float32(mean["lesion"]) + np.float32(tex["lesion"]) * fields[0]
        img = img * (1.0 - w_lesion) + les * w_lesion
    return img.astype(np.float32)


# --- the case --------------------------------------------------------------------------


def _pick_source(rng: np.random.Generator, source: str) -> str:
    if source != "mixed":
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; known: mixed, {', '.join(SOURCES)}")
        if source != "generator" and not real_sources_available()[source]:
            raise FileNotFoundError(f"label map for source {source!r} not found "
                                    "(../shared/data, or AINODE_SHARED_DATA)")
        return source
    have = [s for s in SOURCES if s == "generator" or real_sources_available()[s]]
    return str(rng.choice(have))


def lesion_in_real_ct(spec: RandomisedSpec) -> RandomisedCase:
    """A lesion of ``spec.diagnosis`` painted into the real TotalSegmentator example CT.

    Why: a real background (real noise, real neighbours, real partial volume) with a
    lesion that follows each type's rule relative to the pancreas as measured in that
    CT, for the phase its aorta shows (the example is non-contrast, so solid lesions
    are subtle there, as on a real non-contrast scan; cysts stand out). The CT's own
    high-frequency noise is kept inside the lesion (only its smooth part is replaced),
    so the lesion is not a flat disc. The case stays on the CT's grid; appearance is
    not randomised (it is a real image).
    """
    from pipelines.phantom.labelmaps import _TOTALSEG, TOTALSEG_CT, TOTALSEG_SEG, _lut, data_root

    if not real_sources_available()["totalseg"]:
        raise FileNotFoundError("TotalSegmentator example not found (../shared/data)")
    rng = np.random.default_rng([spec.seed, 0x7EA1])
    diagnosis = spec.diagnosis or str(rng.choice(DIAGNOSES, p=_DIAG_P))
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"unknown diagnosis {diagnosis!r}; known: {', '.join(DIAGNOSES)}")
    seg = sitk.ReadImage(str(data_root() / TOTALSEG_SEG))
    ct = sitk.ReadImage(str(data_root() / TOTALSEG_CT), sitk.sitkFloat32)
    ct.CopyInformation(seg)
    lut = _lut(_TOTALSEG, 256, "body")
    codes = lut[np.clip(sitk.GetArrayFromImage(seg).astype(np.int64), 0, 255)]
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    # insert_lesion works in LPS with identity direction: flip the axes the file flips.
    d = np.asarray(ct.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(d), np.eye(3)):
        raise ValueError("lesion_in_real_ct expects an axis-aligned CT")
    flips = tuple(2 - i for i in range(3) if d[i, i] < 0)  # array axes (z, y, x)
    sp = tuple(float(v) for v in ct.GetSpacing())
    m = LabelMap(np.flip(codes, flips).copy(), sp, (0.0, 0.0, 0.0))  # type: ignore[arg-type]
    gland = np.isin(m.codes, PANCREAS_CODES)
    # The parenchyma, not its fatty or partial-volumed edge (the upper quartile), and
    # the phase from the aorta: the same rules as the painted cases then apply.
    p_hu = float(np.percentile(np.flip(hu, flips)[gland], 75))
    aorta = float(np.median(np.flip(hu, flips)[m.codes == code("aorta")])) \
        if (m.codes == code("aorta")).any() else 40.0
    phase = "arterial" if aorta > 220 else "portal_venous" if aorta > 110 else "non_contrast"
    w = np.zeros(m.codes.shape, np.float32)
    linfo: dict[str, Any] = {}
    if diagnosis != "normal":
        w, linfo = insert_lesion(m, rng, diagnosis, diameter_mm=spec.lesion_diameter_mm)
        les = _lesion_mean(rng, True, phase, diagnosis, linfo["kind"], p_hu, 8.0)
        w = np.flip(w, flips)
        smooth = ndimage.gaussian_filter(hu, 1.0)
        hu = hu + w * (les - smooth)
        linfo["lesion_hu"] = les
    tissue = np.flip(m.codes, flips).copy()
    label = np.zeros(tissue.shape, np.uint8)
    label[np.isin(tissue, PANCREAS_CODES)] = 1
    label[tissue == code("lesion")] = 2
    origin = tuple(float(v) for v in ct.GetOrigin())
    return RandomisedCase(
        image=np.ascontiguousarray(hu, np.float32), label=label, tissue=tissue,
        spacing=sp, origin=origin, diagnosis=diagnosis,  # type: ignore[arg-type]
        lesion_diameter_mm=linfo.get("diameter_mm"), lesion_location=linfo.get("location"),
        source="realct", modality="CT", contrast=phase,
        intensities={"pancreas": p_hu, **({"lesion": linfo["lesion_hu"]} if linfo else {})},
        direction=tuple(float(v) for v in ct.GetDirection()),
    )


def source_of(seed: int, source: str = "mixed") -> str:
    """Which label map ``synthesise`` draws for ``seed``, without drawing the case: the
    pick is the first draw of the case's stream, so a set can leave a source out (a
    held-out test source) and stay the same cases seed for seed."""
    if source in ("realct", "siemens"):
        return source
    return _pick_source(np.random.default_rng([seed, 0x5A17]), source)


SIEMENS_SERIES = Path("dicom/ct_abdomen_siemens")
SIEMENS_SEG = Path("nifti/totalsegmentator_example/example_seg_dicom.nii.gz")


@functools.lru_cache(maxsize=1)
def _siemens_cached() -> tuple[sitk.Image, npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """The series (decoded once per process: 20 JPEG 2000 files), its tissue codes and HU."""
    from pipelines.phantom.labelmaps import _TOTALSEG, _lut, data_root
    from pipelines.volume import load_series

    root = data_root()
    if not (root / SIEMENS_SEG).exists():
        raise FileNotFoundError("Siemens series or its labels not found (../shared/data)")
    img = load_series(sorted((root / SIEMENS_SERIES).glob("*.dcm"))).to_sitk()
    seg = sitk.Resample(sitk.ReadImage(str(root / SIEMENS_SEG)), img, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0)
    lut = _lut(_TOTALSEG, 256, "body")
    tissue = lut[np.clip(sitk.GetArrayFromImage(seg).astype(np.int64), 0, 255)]
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    hu.flags.writeable = False
    tissue.flags.writeable = False
    return img, tissue, hu


def real_siemens_ct(spec: RandomisedSpec) -> RandomisedCase:
    """The real Siemens series with TotalSegmentator's labels, as a training case.

    Why: the one real contrast-enhanced series with a pancreas label, in a 50 cm
    field of view with table and arms, covering only the top of the gland (2.5 ml
    in 20 slices of 2 mm): what a short upper-abdomen series looks like. Nothing is
    painted into it (no lesion fits in that sliver; its cases are normal); each seed
    only moves the HU by a small offset and adds a little noise. A model that trains
    on it has seen it: its figures on this series are then not evidence.
    """
    rng = np.random.default_rng([spec.seed, 0x51E3])
    img, tissue, series_hu = _siemens_cached()
    hu = series_hu.copy()
    body = hu > -500.0
    noise = float(rng.uniform(0.0, 12.0))
    hu[body] += float(rng.uniform(-20.0, 20.0)) + noise * rng.standard_normal(
        int(body.sum())).astype(np.float32)
    label = np.zeros(tissue.shape, np.uint8)
    label[np.isin(tissue, PANCREAS_CODES)] = 1
    return RandomisedCase(
        image=np.clip(hu, -1024.0, 3071.0), label=label, tissue=tissue.astype(np.uint8),
        spacing=tuple(float(v) for v in img.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
        diagnosis="normal", lesion_diameter_mm=None, lesion_location=None,
        source="siemens", modality="CT", contrast="portal_venous",
        intensities={"pancreas": float(np.median(hu[label > 0]))},
        direction=tuple(float(v) for v in img.GetDirection()),
    )


def synthesise(spec: RandomisedSpec) -> RandomisedCase:
    if spec.source == "realct":
        return lesion_in_real_ct(spec)
    if spec.source == "siemens":
        return real_siemens_ct(spec)
    rng = np.random.default_rng([spec.seed, 0x5A17])  # apart from the generator's streams
    source = _pick_source(rng, spec.source)
    modality = str(spec.modality).upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"unknown modality {spec.modality!r}; known: CT, MR")
    phases = CT_PHASES if modality == "CT" else MR_CONTRASTS
    contrast = spec.contrast or str(rng.choice(phases))
    if contrast not in phases:
        raise ValueError(f"unknown {modality} contrast {contrast!r}; known: {', '.join(phases)}")
    diagnosis = spec.diagnosis or str(rng.choice(DIAGNOSES, p=_DIAG_P))
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"unknown diagnosis {diagnosis!r}; known: {', '.join(DIAGNOSES)}")
    # Acquisition: in-plane resolution and kernel, slice thickness; output grid.
    acq_xy = float(rng.uniform(0.6, 1.0))
    thick = float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 4.0, 5.0]))
    if spec.spacing is not None:
        out_sp = tuple(float(s) for s in spec.spacing)
    else:
        sxy = float(rng.uniform(1.2, 1.8))
        out_sp = (sxy, sxy, max(thick, 1.25))
    k = min(3, max(1, round(out_sp[2] / out_sp[0])))  # thin work slices, at most 3
    work_sp = (out_sp[0], out_sp[1], out_sp[2] / k)

    base = load_source(source, rng, fine_mm=max(1.5, 0.75 * work_sp[0]))
    m, dinfo = deform(base, rng, spacing=work_sp)  # type: ignore[arg-type]
    _fill_viscera(m, rng)
    variants = apply_variants(m, rng)
    w = np.zeros(m.codes.shape, np.float32)
    linfo: dict[str, Any] = {}
    if diagnosis != "normal":
        w, linfo = insert_lesion(m, rng, diagnosis, diameter_mm=spec.lesion_diameter_mm)
    look = add_lookalikes(m, rng)
    mean, tex = _draw_intensities(rng, modality, contrast, diagnosis, linfo.get("kind", ""))
    img = _render(m, w, mean, tex, rng)
    # Acquisition blur: kernel/in-plane resolution and the slice profile (FWHM = thickness).
    kernel = float(rng.uniform(1.0, 2.2))  # PSF FWHM in units of the in-plane resolution
    sig_xy = acq_xy * kernel / 2.355 / work_sp[0]
    sig_z = max(thick, work_sp[2]) / 2.355 / work_sp[2]
    img = ndimage.gaussian_filter(img, sigma=(sig_z, sig_xy, sig_xy), mode="nearest")
    meta: dict[str, float] = {"acq_inplane_mm": acq_xy, "slice_thickness_mm": thick,
                              "kernel_fwhm_factor": kernel, **dinfo}
    if modality == "MR":
        bias = _smooth_field(rng, img.shape, 90.0 / work_sp[0])
        strength = float(rng.uniform(0.05, 0.35))
        img = img * np.exp(strength * bias)
        sd = float(rng.uniform(0.01, 0.05)) * float(np.percentile(img, 99))
        n1 = rng.standard_normal(img.shape).astype(np.float32) * sd
        n2 = rng.standard_normal(img.shape).astype(np.float32) * sd
        img = np.sqrt((img + n1) ** 2 + n2**2)  # magnitude image: Rician noise
        gain = float(rng.uniform(300.0, 3000.0))
        img = np.clip(img * gain, 0.0, 65535.0)
        meta.update(bias_strength=strength, noise_sd=sd * gain, gain=gain)
    else:
        sd = float(rng.uniform(5.0, 30.0))  # dose
        corr = 0.5 if kernel < 1.5 else 1.0  # sharp kernels: finer-grained noise
        noise = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32),
                                        (0.3, corr, corr))
        img = np.clip(img + noise * (sd / max(float(noise.std()), 1e-6)), -1024.0, 3071.0)
        meta.update(noise_sd=sd)
    # Back to the output grid: every k-th slice of the thin work grid.
    img = img[::k].astype(np.float32)
    tissue = m.codes[::k]
    label = np.zeros(tissue.shape, np.uint8)
    label[np.isin(tissue, PANCREAS_CODES)] = 1
    label[tissue == code("lesion")] = 2
    if diagnosis != "normal" and not (label == 2).any():
        # The lesion fell between output slices: keep its middle slice's voxels.
        zz = np.nonzero((m.codes == code("lesion")).any(axis=(1, 2)))[0]
        kz = int(zz[len(zz) // 2])
        j = kz // k
        sl = m.codes[kz] == code("lesion")
        label[j][sl] = 2
        tissue[j][sl] = code("lesion")
    present = set(np.unique(tissue).tolist())
    intens = {STRUCTURES[i]: mean.get(STRUCTURES[i], mean["body"]) for i in sorted(present)}
    return RandomisedCase(
        image=img, label=label, tissue=tissue, spacing=out_sp,  # type: ignore[arg-type]
        origin=m.origin, diagnosis=diagnosis,
        lesion_diameter_mm=linfo.get("diameter_mm"), lesion_location=linfo.get("location"),
        source=source, modality=modality, contrast=contrast, intensities=intens,
        lookalikes=look, variants=variants, meta=meta,
    )


RANDOMISED_CSV_FIELDS = (*CASES_CSV_FIELDS, "source", "modality", "contrast", "spacing",
                         "variants", "lookalikes")


def write_randomised_dataset(
    out: Path,
    seeds: Iterable[int],
    *,
    source: Source = "mixed",
    modality: Modality = "CT",
    contrast: str | None = None,
    images: str = "imagesTr",
    labels: str = "labelsTr",
    prefix: str = "randomised",
    spacing: tuple[float, float, float] | None = None,
    exclude_sources: tuple[str, ...] = (),
) -> list[dict[str, str]]:
    """One case per seed in the Task07 layout ``find_cases``/``read_case`` read (CT as
    int16 HU, MR as float32), with ``cases.csv`` (diagnosis, lesion size and location,
    and which source, modality and contrast made it). Seeds whose label map would come
    from ``exclude_sources`` are skipped (kept apart as a test source)."""
    (out / images).mkdir(parents=True, exist_ok=True)
    (out / labels).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for seed in seeds:
        if exclude_sources and source_of(seed, source) in exclude_sources:
            continue
        t0 = time.monotonic()
        case = synthesise(RandomisedSpec(seed=seed, source=source, modality=modality,
                                         contrast=contrast, spacing=spacing))
        cid = f"{prefix}_{seed:06d}"
        img = sitk.GetImageFromArray(case.image)
        lab = sitk.GetImageFromArray(case.label)
        for im in (img, lab):
            im.SetSpacing(case.spacing)
            im.SetOrigin(case.origin)
            im.SetDirection(case.direction)
        if case.modality == "CT":  # int16 HU, what scanners export
            img = sitk.Cast(sitk.Round(img), sitk.sitkInt16)
        sitk.WriteImage(img, str(out / images / f"{cid}_0000.nii.gz"))
        sitk.WriteImage(lab, str(out / labels / f"{cid}.nii.gz"))
        rows.append({
            "case_id": cid, "diagnosis": case.diagnosis,
            "lesion_diameter_mm": "" if case.lesion_diameter_mm is None
            else f"{case.lesion_diameter_mm:.1f}",
            "location": case.lesion_location or "", "source": case.source,
            "modality": case.modality, "contrast": case.contrast,
            "spacing": "x".join(f"{s:.2f}" for s in case.spacing),
            "variants": ";".join(case.variants),
            "lookalikes": ";".join(sorted({d["kind"] for d in case.lookalikes})),
            "seconds": f"{time.monotonic() - t0:.1f}",
        })
    merge_cases_csv(out / "cases.csv", rows, RANDOMISED_CSV_FIELDS)  # "seconds" stays out
    return rows

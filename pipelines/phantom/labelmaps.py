"""Anatomical label maps in one common label set, from the generator and from real maps.

Why: the randomised (SynthSeg-style) generator paints images from label maps,
and a network trained on them learns only what the maps share: the shape and
the arrangement of the organs around the pancreas, never one generator's
intensities. Each source is mapped to ``STRUCTURES`` on an LPS grid with
identity direction (array axes z, y, x), so everything downstream is
source-agnostic:

* ``generator``: the tissue map of ``pipelines.phantom.generator`` (its own
  anatomy, lesion-free: the randomised generator inserts its own lesions);
* ``amos``: the AMOS22 label map in ``../shared/data/labelmaps/`` (15 organs,
  no body outline, fat, bone or bowel: those are added here from the organs'
  positions, and the unlabelled abdominal cavity is left as ``viscera`` for
  the per-case bowel/fat fill);
* ``totalseg``: the TotalSegmentator example (v2 ``total`` class map) with
  body outline, fat and bowel gas taken from its CT. That CT is then a
  training source: real-CT figures on it are not on unseen data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from pipelines.phantom.generator import TISSUES, PhantomSpec, generate_labelmap

__all__ = [
    "PANCREAS_CODES",
    "STRUCTURES",
    "LabelMap",
    "code",
    "data_root",
    "load_source",
    "real_sources_available",
]

# The common label set. "viscera" is a placeholder (unlabelled abdominal cavity of a
# real map) that the randomised generator fills per case with bowel loops and fat.
STRUCTURES: tuple[str, ...] = (
    "background", "body", "fat", "muscle", "liver", "spleen", "kidney", "stomach",
    "bowel", "bowel_fluid", "bowel_gas", "gallbladder", "aorta", "ivc", "portal_vein",
    "bone", "spinal_canal", "lung", "adrenal", "bladder", "pancreas", "pancreas_fat",
    "duct", "lesion", "cyst", "calcification", "vessel_small", "viscera",
)
_CODE = {name: i for i, name in enumerate(STRUCTURES)}


def code(name: str) -> int:
    return _CODE[name]


# Training label 1 (pancreas) is every one of these; "lesion" is label 2.
PANCREAS_CODES: tuple[int, ...] = (code("pancreas"), code("pancreas_fat"), code("duct"))


@dataclass(slots=True)
class LabelMap:
    """Codes of ``STRUCTURES`` on an LPS, identity-direction grid."""

    codes: npt.NDArray[np.uint8]  # (z, y, x)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)

    def pancreas(self) -> npt.NDArray[np.bool_]:
        return np.isin(self.codes, (*PANCREAS_CODES, code("lesion")))


def data_root() -> Path:
    """``../shared/data`` beside the checkout (``AINODE_SHARED_DATA`` overrides)."""
    env = os.environ.get("AINODE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


AMOS_LABEL = Path("labelmaps/amos_0013_label.nii.gz")
TOTALSEG_SEG = Path("nifti/totalsegmentator_example/example_seg.nii.gz")
TOTALSEG_CT = Path("nifti/totalsegmentator_example/example_ct_sm.nii.gz")


def real_sources_available() -> dict[str, bool]:
    root = data_root()
    return {
        "amos": (root / AMOS_LABEL).is_file(),
        "totalseg": (root / TOTALSEG_SEG).is_file() and (root / TOTALSEG_CT).is_file(),
    }


# AMOS22 ids (order verified against the data README: voxel counts and positions).
_AMOS = {
    1: "spleen", 2: "kidney", 3: "kidney", 4: "gallbladder", 5: "stomach", 6: "liver",
    7: "stomach", 8: "aorta", 9: "ivc", 10: "pancreas", 11: "adrenal", 12: "adrenal",
    13: "bowel", 14: "bladder", 15: "body",
}
# TotalSegmentator v2 "total" ids (totalsegmentator/map_to_binary.py), abdominal ones.
_TOTALSEG: dict[int, str] = {
    1: "spleen", 2: "kidney", 3: "kidney", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 8: "adrenal", 9: "adrenal", 15: "stomach", 18: "bowel", 19: "bowel",
    20: "bowel", 21: "bladder", 22: "body", 23: "cyst", 24: "cyst", 51: "muscle",
    52: "aorta", 62: "ivc", 63: "ivc", 64: "portal_vein", 65: "aorta", 66: "aorta",
    67: "ivc", 68: "ivc", 79: "spinal_canal", 116: "bone", 117: "bone",
}
_TOTALSEG.update({i: "lung" for i in range(10, 15)})
_TOTALSEG.update({i: "bone" for i in range(25, 51)})  # sacrum, vertebrae
_TOTALSEG.update({i: "bone" for i in range(69, 79)})  # humeri .. hips
_TOTALSEG.update({i: "muscle" for i in range(80, 90)})  # gluteal, autochthon, iliopsoas
_TOTALSEG.update({i: "bone" for i in range(92, 116)})  # ribs
_GENERATOR = {
    "air": "background", "fat": "fat", "soft": "body", "muscle": "muscle", "bone": "bone",
    "liver": "liver", "spleen": "spleen", "kidney": "kidney", "aorta": "aorta",
    "vein": "portal_vein", "bowel": "bowel", "fluid": "bowel_fluid", "pancreas": "pancreas",
    "duct": "duct", "lesion": "pancreas",
}


def _lut(table: dict[int, str], n: int, default: str) -> npt.NDArray[np.uint8]:
    lut = np.full(n, code(default), np.uint8)
    lut[0] = code("background")
    for k, v in table.items():
        if k < n:
            lut[k] = code(v)
    return lut


def _canonical(img: sitk.Image, spacing: tuple[float, float, float],
               interp: int = sitk.sitkNearestNeighbor, fill: float = 0.0) -> sitk.Image:
    """``img`` resampled onto an identity-direction grid covering the same box."""
    size = img.GetSize()
    corners = np.array([
        img.TransformContinuousIndexToPhysicalPoint((i * (size[0] - 1), j * (size[1] - 1),
                                                     k * (size[2] - 1)))
        for i in (0, 1) for j in (0, 1) for k in (0, 1)
    ])
    lo, hi = corners.min(0), corners.max(0)
    n = [int(np.floor((hi[d] - lo[d]) / spacing[d])) + 1 for d in range(3)]
    return sitk.Resample(img, n, sitk.Transform(), interp, tuple(float(v) for v in lo),
                         spacing, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), fill,
                         img.GetPixelID())


def _as_map(img: sitk.Image, lut: npt.NDArray[np.uint8]) -> LabelMap:
    arr = sitk.GetArrayFromImage(img).astype(np.int64)
    arr = np.clip(arr, 0, len(lut) - 1)
    sp = tuple(float(s) for s in img.GetSpacing())
    org = tuple(float(o) for o in img.GetOrigin())
    return LabelMap(lut[arr], sp, org)  # type: ignore[arg-type]


def _mm_grid(m: LabelMap) -> tuple[npt.NDArray[np.float32], ...]:
    nz, ny, nx = m.codes.shape
    xs = (m.origin[0] + m.spacing[0] * np.arange(nx)).astype(np.float32)
    ys = (m.origin[1] + m.spacing[1] * np.arange(ny)).astype(np.float32)
    zs = (m.origin[2] + m.spacing[2] * np.arange(nz)).astype(np.float32)
    return zs, ys, xs


def _line_fit(z: npt.NDArray, v: npt.NDArray, zq: npt.NDArray) -> npt.NDArray:
    if len(z) < 2:
        return np.full(zq.shape, float(v.mean()) if len(v) else 0.0)
    a, b = np.polyfit(z, v, 1)
    return a * zq + b


def _add_body_wall_and_spine(m: LabelMap, *, t_fat: float = 18.0, t_muscle: float = 9.0,
                             margin: float = 12.0) -> None:
    """Body outline, subcutaneous fat, abdominal wall, spine and back muscles around the
    organs of a map that has only organs (AMOS). Positions follow the aorta and IVC:
    the vertebral body lies behind them, between them in x."""
    c = m.codes
    zs, ys, xs = _mm_grid(m)
    nz = c.shape[0]
    ao, iv = c == code("aorta"), c == code("ivc")
    z_ao, y_ao, x_ao = [], [], []
    x_iv: list[float] = []
    z_iv: list[float] = []
    for k in range(nz):
        if ao[k].any():
            yy, xx = np.nonzero(ao[k])
            z_ao.append(zs[k]); y_ao.append(ys[yy].mean()); x_ao.append(xs[xx].mean())  # noqa: E702
        if iv[k].any():
            yy, xx = np.nonzero(iv[k])
            z_iv.append(zs[k]); x_iv.append(xs[xx].mean())  # noqa: E702
    ax_x = _line_fit(np.array(z_ao), np.array(x_ao), zs)
    ax_y = _line_fit(np.array(z_ao), np.array(y_ao), zs)
    iv_x = _line_fit(np.array(z_iv), np.array(x_iv), zs) if z_iv else ax_x - 30.0
    spine_x = 0.5 * (ax_x + iv_x)
    spine_y = ax_y + 28.0  # +y is posterior in LPS
    organs = c > 0
    # Per-slice extents of the organs about the spine, smoothed along z.
    half_w = np.zeros(nz)
    ant = np.zeros(nz)
    for k in range(nz):
        if organs[k].any():
            yy, xx = np.nonzero(organs[k])
            half_w[k] = np.abs(xs[xx] - spine_x[k]).max()
            ant[k] = spine_y[k] - ys[yy].min()
    win = max(1, round(25.0 / m.spacing[2]))
    half_w = ndimage.maximum_filter1d(half_w, 2 * win + 1)
    ant = ndimage.maximum_filter1d(ant, 2 * win + 1)
    half_w = np.maximum(half_w, 0.8 * half_w.max())
    ant = np.maximum(ant, 0.8 * ant.max())
    wall = t_fat + t_muscle + margin
    a = half_w + wall
    y_front = spine_y - ant - wall
    y_back = spine_y + 55.0 + t_fat
    cy, b = 0.5 * (y_front + y_back), 0.5 * (y_back - y_front)
    X, Y = xs[None, None, :], ys[None, :, None]  # noqa: N806
    p = 2.6  # a superellipse: the abdomen is flatter than an ellipse at the back
    body = (np.abs((X - spine_x[:, None, None]) / a[:, None, None]) ** p
            + np.abs((Y - cy[:, None, None]) / b[:, None, None]) ** p) <= 1.0
    body |= ndimage.binary_dilation(organs, iterations=2)
    # Depth below the skin within each slice (huge z sampling: a per-slice distance).
    depth = ndimage.distance_transform_edt(body, sampling=(1e4, m.spacing[1], m.spacing[0]))
    new = np.zeros_like(c)
    new[body] = code("viscera")
    new[body & (depth < t_fat + t_muscle)] = code("muscle")
    new[body & (depth < t_fat)] = code("fat")
    sx, sy = spine_x[:, None, None], spine_y[:, None, None]
    d_back = ((X - sx) / 24.0) ** 2 + ((Y - sy - 48.0) / 20.0) ** 2
    new[body & ((((X - sx - 28) / 20.0) ** 2 + ((Y - sy - 46.0) / 19.0) ** 2 <= 1)
                | (((X - sx + 28) / 20.0) ** 2 + ((Y - sy - 46.0) / 19.0) ** 2 <= 1))] \
        = code("muscle")
    new[body & ((((X - sx) / 21.0) ** 2 + ((Y - sy) / 16.0) ** 2) <= 1.0)] = code("bone")
    ring = (((X - sx) / 13.0) ** 2 + ((Y - sy - 24.0) / 12.0) ** 2) <= 1.0
    new[body & ring] = code("bone")
    new[body & ((((X - sx) / 6.5) ** 2 + ((Y - sy - 24.0) / 6.0) ** 2) <= 1.0)] = \
        code("spinal_canal")
    new[body & (d_back < 0.15)] = code("bone")  # spinous process
    # Psoas muscles below the kidneys' centre, growing caudally.
    kid = c == code("kidney")
    if kid.any():
        kz = zs[np.nonzero(kid.any(axis=(1, 2)))[0]].mean()
        grow = np.clip((kz - zs) / 80.0, 0.0, 1.0)[:, None, None]
        r = 4.0 + 12.0 * grow
        psoas = (((np.abs(X - sx) - 32.0) / (r + 1e-3)) ** 2
                 + ((Y - sy + 2.0) / (r + 1e-3)) ** 2) <= 1.0
        new[body & psoas & (grow > 0)] = code("muscle")
    # Ribs in cross-section along the wall in the upper slices (above the kidneys' centre).
    if kid.any():
        for kk in np.nonzero(zs > kz)[0].tolist():
            for ang in np.deg2rad(np.arange(-160, -10, 20)).tolist():  # posterolateral
                rx = spine_x[kk] + (a[kk] - t_fat - 4.0) * np.cos(ang) * 0.95
                ry = cy[kk] - (b[kk] - t_fat - 4.0) * np.sin(ang) * 0.95
                disk = ((xs[None, :] - rx) ** 2 + (ys[:, None] - ry) ** 2) <= 16.0
                new[kk][disk & body[kk]] = code("bone")
    keep = organs & (c != code("body"))
    new[keep] = c[keep]
    # Lung above the dome of the liver/spleen, in columns those organs cover.
    dome = np.isin(c, (code("liver"), code("spleen"), code("stomach")))
    cover = np.asarray(dome.any(axis=0))
    top = np.where(cover, nz - 1 - np.argmax(dome[::-1], axis=0), nz)
    top = ndimage.minimum_filter(top, size=5)
    zi = np.arange(nz)[:, None, None]
    lung = (new == code("viscera")) & (zi > top[None]) & cover[None]
    new[lung] = code("lung")
    c[...] = new


@functools.lru_cache(maxsize=2)
def _amos_cached(spacing: tuple[float, float, float]) -> LabelMap:
    img = sitk.ReadImage(str(data_root() / AMOS_LABEL))
    arr = sitk.GetArrayViewFromImage(img)
    zpan = np.nonzero((arr == 10).any(axis=(1, 2)))[0]
    zlo = max(0, int(zpan.min()) - int(130.0 / img.GetSpacing()[2]))
    img = img[:, :, zlo:]
    m = _as_map(_canonical(img, spacing), _lut(_AMOS, 64, "body"))
    _add_body_wall_and_spine(m)
    return m


@functools.lru_cache(maxsize=2)
def _totalseg_cached(spacing: tuple[float, float, float]) -> LabelMap:
    seg = sitk.ReadImage(str(data_root() / TOTALSEG_SEG))
    ct = sitk.ReadImage(str(data_root() / TOTALSEG_CT), sitk.sitkFloat32)
    ct.CopyInformation(seg)
    m = _as_map(_canonical(seg, spacing), _lut(_TOTALSEG, 256, "body"))
    hu = sitk.GetArrayFromImage(_canonical(ct, spacing, sitk.sitkLinear, -1024.0))
    air = hu < -400
    body = ndimage.binary_opening(~air, iterations=2)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
        body = lab == 1 + int(np.argmax(sizes))
    c = m.codes
    unl = body & (c == code("background"))
    c[unl] = code("body")
    c[unl & (hu > -190) & (hu < -30)] = code("fat")
    c[unl & air] = code("bowel_gas")
    c[unl & (hu > 250)] = code("bone")
    c[~body & (c != code("lung"))] = code("background")
    return m


def load_source(name: str, rng: np.random.Generator, fine_mm: float = 1.5) -> LabelMap:
    """One source's label map on a grid of about ``fine_mm`` in-plane; the generator's
    is drawn from ``rng``, the real ones are built once per process and grid (and
    copied, so a caller may edit them)."""
    f = round(float(np.clip(fine_mm, 1.0, 3.0)) * 4) / 4  # few distinct grids: cache hits
    if name == "generator":
        spec = PhantomSpec(seed=int(rng.integers(0, 2**31 - 1)), diagnosis="normal",
                           spacing=(f, f, max(f, 2.0)))
        p, tissue = generate_labelmap(spec)
        lut = np.array([code(_GENERATOR[t]) for t in TISSUES], np.uint8)
        return LabelMap(lut[tissue], p.spacing, p.origin)
    if name == "amos":
        m = _amos_cached((f, f, max(f, 2.5)))
    elif name == "totalseg":
        m = _totalseg_cached((f, f, f))
    else:
        raise ValueError(f"unknown label-map source {name!r}")
    return LabelMap(m.codes.copy(), m.spacing, m.origin)

"""Synthetic abdominal CT / T1-MR phantoms with a pancreas and typed lesions.

Why phantoms: no labelled pancreatic-tumour data can be shipped or downloaded
here, yet the node must ship demo weights and prove its detection/evaluation
code end to end. The phantom follows the radiological appearance of each
tumour type closely enough that a network has to learn the right cues:

* PDAC: hypo-attenuating, ill-defined (soft margin), irregular, with
  upstream (tail-side) main-duct dilation;
* PNET: hyper-enhancing, well-defined, round;
* IPMN: cystic, multilocular, communicating with a dilated duct;
* other benign: simple unilocular cyst.

Every case is painted from a tissue map so the same anatomy renders as CT
(HU) or T1-weighted MR. Geometry is LPS with identity direction: array axes
(z, y, x) = (slices, rows, cols).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["DIAGNOSES", "TISSUES", "Phantom", "PhantomSpec", "generate", "generate_labelmap"]

Contrast = Literal["ct", "mr_t1"]
DIAGNOSES: tuple[str, ...] = ("normal", "PDAC", "PNET", "IPMN", "other_benign")
# Sampling weights of the diagnoses: PDAC is the target, so it is the largest group.
_DIAG_P = np.array([0.24, 0.36, 0.14, 0.13, 0.13])

# Tissue intensities: CT in HU (mean, sd across cases), T1-MR in arbitrary units.
_CT = {
    "air": (-1000.0, 0.0), "fat": (-100.0, 10.0), "soft": (45.0, 5.0), "muscle": (55.0, 5.0),
    "bone": (450.0, 80.0), "liver": (105.0, 10.0), "spleen": (120.0, 10.0),
    "kidney": (180.0, 20.0), "aorta": (220.0, 50.0), "vein": (160.0, 25.0),
    "bowel": (25.0, 8.0), "fluid": (10.0, 5.0), "pancreas": (120.0, 12.0),
}
_MR = {
    "air": (0.0, 0.0), "fat": (950.0, 40.0), "soft": (330.0, 20.0), "muscle": (300.0, 20.0),
    "bone": (520.0, 40.0), "liver": (560.0, 30.0), "spleen": (380.0, 25.0),
    "kidney": (420.0, 30.0), "aorta": (90.0, 20.0), "vein": (110.0, 20.0),
    "bowel": (260.0, 30.0), "fluid": (90.0, 15.0), "pancreas": (700.0, 40.0),
}


@dataclass(frozen=True, slots=True)
class PhantomSpec:
    """What to generate; every random choice comes from ``seed``."""

    seed: int
    contrast: Contrast = "ct"
    diagnosis: str | None = None  # None: drawn from the case mix
    lesion_diameter_mm: float | None = None  # None: uniform 5..40 mm
    spacing: tuple[float, float, float] | None = None  # (x, y, z) mm; None: drawn


@dataclass(slots=True)
class Phantom:
    image: npt.NDArray[np.float32]  # (z, y, x) HU or T1 units
    label: npt.NDArray[np.uint8]  # 0 background, 1 pancreas, 2 lesion (Task07)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    diagnosis: str
    lesion_diameter_mm: float | None
    lesion_location: str | None
    meta: dict[str, float] = field(default_factory=dict)


def _catmull(points: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    """A smooth centreline through the control points (Catmull-Rom spline)."""
    p = np.vstack([points[0], points, points[-1]])
    out = []
    segs = len(points) - 1
    per = max(2, n // segs)
    for i in range(segs):
        p0, p1, p2, p3 = p[i], p[i + 1], p[i + 2], p[i + 3]
        t = np.linspace(0, 1, per, endpoint=(i == segs - 1))[:, None]
        out.append(
            0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                   + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    return np.vstack(out)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> npt.NDArray:
    """Zero-mean, unit-sd smooth random field (lobulated surfaces, fat islands)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    sd = float(f.std()) or 1.0
    return f / sd


# The tissue classes the generator paints, in code order (0 = air). ``generate_labelmap``
# returns a map of these codes so the same anatomy can be re-rendered with another
# appearance model (pipelines.phantom.randomised); "duct" and "lesion" are the
# pancreatic duct and the lesion (label 2), the rest are the keys of the tables above.
TISSUES: tuple[str, ...] = (
    "air", "fat", "soft", "muscle", "bone", "liver", "spleen", "kidney", "aorta", "vein",
    "bowel", "fluid", "pancreas", "duct", "lesion",
)


def generate(spec: PhantomSpec) -> Phantom:
    return _generate(spec, want_tissue=False)[0]


def generate_labelmap(spec: PhantomSpec) -> tuple[Phantom, npt.NDArray[np.uint8]]:
    """The phantom and its tissue map (codes index ``TISSUES``), drawn from the same seed.

    Why: the generator's anatomy is one of the label-map sources of the randomised
    (SynthSeg-style) generator. The phantom returned is exactly ``generate(spec)``;
    the tissue map records which tissue each voxel was painted with before the
    lesion blend, blur and noise (the lesion is where the label is 2).
    """
    phantom, tissue = _generate(spec, want_tissue=True)
    assert tissue is not None
    return phantom, tissue


def _generate(
    spec: PhantomSpec, *, want_tissue: bool
) -> tuple[Phantom, npt.NDArray[np.uint8] | None]:
    """``generate``'s body; with ``want_tissue`` every paint also writes its tissue code."""
    rng = np.random.default_rng(spec.seed)
    table = _CT if spec.contrast == "ct" else _MR
    tis = {k: float(m + s * rng.standard_normal()) for k, (m, s) in table.items()}
    # Contrast timing: scales every enhancement above unenhanced soft tissue (CT only).
    if spec.contrast == "ct":
        c = float(rng.uniform(0.7, 1.25))
        for k in ("liver", "spleen", "kidney", "aorta", "vein", "pancreas"):
            tis[k] = 45.0 + (tis[k] - 45.0) * c
    diagnosis = spec.diagnosis or str(rng.choice(DIAGNOSES, p=_DIAG_P))
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"unknown diagnosis {diagnosis!r}; known: {', '.join(DIAGNOSES)}")

    if spec.spacing is None:
        sxy = float(rng.uniform(1.4, 2.0))
        sz = float(rng.choice([1.5, 2.0, 2.5, 3.0]))
        spacing = (sxy, sxy, sz)
    else:
        spacing = spec.spacing
    fov = (300.0, 240.0, float(rng.uniform(120.0, 150.0)))  # x, y, z mm
    nx, ny, nz = (round(f / s) for f, s in zip(fov, spacing, strict=True))
    origin = (-nx * spacing[0] / 2, -ny * spacing[1] / 2, -nz * spacing[2] / 2)
    zs = origin[2] + spacing[2] * np.arange(nz, dtype=np.float32)
    ys = origin[1] + spacing[1] * np.arange(ny, dtype=np.float32)
    xs = origin[0] + spacing[0] * np.arange(nx, dtype=np.float32)
    Z, Y, X = zs[:, None, None], ys[None, :, None], xs[None, None, :]  # noqa: N806

    img = np.full((nz, ny, nx), tis["air"], np.float32)
    tissue = np.zeros(img.shape, np.uint8) if want_tissue else None

    def paint(mask: npt.NDArray[np.bool_], key: str) -> None:
        img[mask] = tis[key]
        if tissue is not None:
            tissue[mask] = TISSUES.index(key)
    z0 = float(rng.uniform(-12, 12))  # pancreas level within the field of view

    def ell(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> npt.NDArray:
        return ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 + ((Z - cz) / az) ** 2 <= 1.0

    def cyl(cx: float, cy: float, r: float) -> npt.NDArray:
        return np.broadcast_to(((X - cx) ** 2 + (Y - cy) ** 2) <= r * r, img.shape)

    a, b = rng.uniform(125, 145), rng.uniform(95, 112)
    body = np.broadcast_to((X / a) ** 2 + (Y / b) ** 2 <= 1.0, img.shape)
    t_fat = rng.uniform(8, 25)
    inner = np.broadcast_to((X / (a - t_fat)) ** 2 + (Y / (b - t_fat)) ** 2 <= 1.0, img.shape)
    paint(body, "fat")
    paint(inner, "soft")
    # Mesenteric fat islands: what makes the pancreas margin realistic to find.
    fat_field = _smooth_noise(rng, img.shape, sigma=4.0 / spacing[0])
    paint(inner & (fat_field > 0.6), "fat")
    # Paraspinal muscles, spine, kidneys, liver, spleen, stomach, vessels.
    paint(cyl(-35, 75, 22) | cyl(35, 75, 22), "muscle")
    paint(cyl(0, 60 + rng.uniform(-4, 4), 18), "bone")
    kz = z0 - 25 + rng.uniform(-10, 10)
    paint(ell(-62, 55, kz, 25, 30, 50) | ell(62, 55, kz + 10, 25, 30, 50), "kidney")
    paint(ell(-75 + rng.uniform(-8, 8), -5, z0 + 45, 62, 78, 75), "liver")
    paint(ell(88, 48, z0 + 30, 24, 38, 50), "spleen")
    stomach = ell(55, -55, z0 + 35, 38, 28, 40)
    paint(stomach, "bowel")
    paint(ell(55, -55, z0 + 35, 30, 20, 32), "fluid")
    paint(cyl(12, 35, rng.uniform(9, 13)), "aorta")
    paint(cyl(-22, 35, rng.uniform(10, 14)), "vein")

    # Pancreas: curved centreline head (right, caudal) -> neck -> body -> tail (left, cranial).
    ctrl = np.array([
        [-38, 0, z0 - 12], [-8, -10, z0 - 2], [28, 2, z0 + 4], [72, 28, z0 + 16]
    ], np.float64) + rng.uniform(-6, 6, size=(4, 3))
    line = _catmull(ctrl, 96)
    seglen = np.linalg.norm(np.diff(line, axis=0), axis=1)
    tpos = np.concatenate([[0.0], np.cumsum(seglen)]) / max(float(seglen.sum()), 1e-6)
    radius = np.interp(tpos, [0, 0.25, 0.4, 0.7, 1.0],
                       [rng.uniform(12, 16), 11, rng.uniform(7, 9), 8.5, rng.uniform(6, 8)])
    # SMV / portal confluence behind the neck, splenic vein along the posterior body/tail.
    nk = line[int(0.3 * len(line))]
    paint(ell(nk[0] + 3, nk[1] + 16, nk[2], 7, 7, 40), "vein")
    sv = line[int(0.35 * len(line)):] + np.array([0, 12, 0])
    # Duodenum: C-loop lateral to the head.
    hd = line[0]
    paint(ell(hd[0] - 22, hd[1] + 2, hd[2], 10, 12, 30), "bowel")

    lo = np.floor((line.min(0) - 30 - np.array(origin)) / np.array(spacing)).astype(int)
    hi = np.ceil((line.max(0) + 30 - np.array(origin)) / np.array(spacing)).astype(int)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array([nx, ny, nz]))
    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    bz, by, bx = Z[sl[0]], Y[:, sl[1]], X[:, :, sl[2]]
    d2 = np.full((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), np.inf, np.float32)
    near = np.zeros(d2.shape, np.int32)
    for i, p in enumerate(line):
        di = (bx - p[0]) ** 2 + (by - p[1]) ** 2 + (bz - p[2]) ** 2
        better = di < d2
        d2 = np.where(better, di, d2)
        near = np.where(better, i, near)
    dist = np.sqrt(d2)
    lob = _smooth_noise(rng, d2.shape, sigma=3.0 / spacing[0])
    gland = dist <= radius[near] * (1.0 + 0.13 * lob)
    sv_d2 = np.full(d2.shape, np.inf, np.float32)
    for p in sv[::3]:
        sv_d2 = np.minimum(sv_d2, (bx - p[0]) ** 2 + (by - p[1]) ** 2 + (bz - p[2]) ** 2)
    sub = img[sl]
    tsub = tissue[sl] if tissue is not None else None

    def paint_sub(mask: npt.NDArray[np.bool_], key: str, code: str | None = None) -> None:
        sub[mask] = tis[key]
        if tsub is not None:
            tsub[mask] = TISSUES.index(code or key)
    paint_sub(sv_d2 <= 16.0, "vein")
    paint_sub(gland, "pancreas")
    label = np.zeros(img.shape, np.uint8)
    lab = label[sl]
    lab[gland] = 1
    # Main pancreatic duct; dilated upstream of an obstructing PDAC, mildly in IPMN.
    duct_r = np.full(len(line), 1.0)
    lesion = np.zeros(d2.shape, np.float32)  # lesion weight 0..1 (soft for PDAC)
    les_val = 0.0
    diam: float | None = None
    location: str | None = None
    if diagnosis != "normal":
        diam = spec.lesion_diameter_mm or float(rng.uniform(5.0, 40.0))
        tl = float(rng.uniform(0.05, 0.92))
        kc = min(int(np.searchsorted(tpos, tl)), len(line) - 1)
        centre = line[kc] + rng.uniform(-0.3, 0.3, 3) * radius[kc]
        location = _location_from_t(tl)
        r = diam / 2.0
        dc = np.sqrt((bx - centre[0]) ** 2 + (by - centre[1]) ** 2 + (bz - centre[2]) ** 2)
        if diagnosis == "PDAC":
            irr = _smooth_noise(rng, d2.shape, sigma=2.0 / spacing[0])
            reff = r * (1.0 + 0.18 * irr)
            lesion = 1.0 / (1.0 + np.exp(-(reff - dc) / 1.3))
            les_val = tis["pancreas"] - float(rng.uniform(45, 85)) if spec.contrast == "ct" \
                else tis["pancreas"] - float(rng.uniform(250, 380))
            duct_r[tpos > tl] = float(rng.uniform(2.2, 3.8))
        elif diagnosis == "PNET":
            lesion = 1.0 / (1.0 + np.exp(-(r - dc) / 0.4))
            les_val = tis["pancreas"] + float(rng.uniform(60, 110)) if spec.contrast == "ct" \
                else tis["pancreas"] - float(rng.uniform(200, 300))
        elif diagnosis == "IPMN":
            lesion = np.zeros(d2.shape, np.float32)
            for _ in range(int(rng.integers(2, 5))):
                off = rng.uniform(-0.45, 0.45, 3) * r
                rr = r * float(rng.uniform(0.45, 0.7))
                dd = np.sqrt((bx - centre[0] - off[0]) ** 2 + (by - centre[1] - off[1]) ** 2
                             + (bz - centre[2] - off[2]) ** 2)
                lesion = np.maximum(lesion, 1.0 / (1.0 + np.exp(-(rr - dd) / 0.4)))
            les_val = tis["fluid"] + float(rng.uniform(0, 10))
            duct_r[:] = float(rng.uniform(1.8, 2.8))
        else:  # other benign: simple cyst
            lesion = 1.0 / (1.0 + np.exp(-(r - dc) / 0.35))
            les_val = tis["fluid"] + float(rng.uniform(-5, 8))
    duct = dist <= np.where(gland, duct_r[near], 0.0)
    paint_sub(duct, "fluid", "duct")
    lab[duct] = 1
    if diagnosis != "normal":
        lesion = lesion.astype(np.float32)
        sub[:] = sub * (1.0 - lesion) + les_val * lesion
        lab[lesion >= 0.5] = 2
        # One lesion is one reference object: soft-edged fragments split off by the
        # 0.5 cut go back to the tissue under them instead of counting as extra lesions.
        comp, n = ndimage.label(lab == 2, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            keep = 1 + int(np.argmax(ndimage.sum(np.ones_like(comp), comp, range(1, n + 1))))
            lab[(comp > 0) & (comp != keep)] = np.where(gland, 1, 0)[(comp > 0) & (comp != keep)]
        # Lesions this small at coarse spacing can vanish; keep at least the centre voxel.
        if not (lab == 2).any():
            idx = np.unravel_index(int(np.argmax(lesion)), lesion.shape)
            lab[idx] = 2
        if tsub is not None:
            tsub[lab == 2] = TISSUES.index("lesion")

    # Scanner: point-spread blur, then correlated noise of case-specific level.
    img = ndimage.gaussian_filter(img, sigma=(0.35, 0.5, 0.5))
    sd = float(rng.uniform(8, 22)) if spec.contrast == "ct" else float(rng.uniform(15, 40))
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 0.6)
    img += noise * (sd / max(float(noise.std()), 1e-6))
    if spec.contrast == "ct":
        img = np.clip(img, -1024, 3071)
    else:
        img = np.clip(img * float(rng.uniform(0.8, 1.2)), 0, 4095)
    return Phantom(
        image=img.astype(np.float32), label=label, spacing=spacing, origin=origin,
        diagnosis=diagnosis, lesion_diameter_mm=diam, lesion_location=location,
        meta={"noise_sd": sd},
    ), tissue


def _location_from_t(t: float) -> str:
    """Head / neck / body / tail by position along the gland (same cut points as inference)."""
    if t < 0.3:
        return "head"
    if t < 0.4:
        return "neck"
    if t < 0.7:
        return "body"
    return "tail"


def expected_lesion_voxels(diameter_mm: float, spacing: tuple[float, float, float]) -> float:
    """Volume of a sphere of that diameter in voxels; used by tests as a sanity bound."""
    return (math.pi / 6.0) * diameter_mm**3 / float(np.prod(spacing))

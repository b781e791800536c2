"""The intensity presets a model package names in its input contract.

A preset name is a promise about maths: a model trained on ``ct_pancreas``
inputs must get exactly those inputs in every job, so each name is defined
once, here, and training, inference and the declared step presets all call
this table. Names are matched exactly (never by prefix), so a new preset is a
new row, not a new meaning for an old name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["INTENSITY_PRESETS", "IntensityPreset", "background", "intensity_preset", "normalise"]

Window = tuple[float, float] | None
_Apply = Callable[[npt.NDArray[np.float32], Window, dict[str, Any]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class IntensityPreset:
    """One named mapping from scanner units to network-input intensities."""

    name: str
    modality: str
    background: float  # fills voxels outside the source when resampling (scanner units)
    apply: _Apply
    needs_window: bool = False
    description: str = ""


def _ct_pancreas(a: npt.NDArray[np.float32], window: Window,
                 record: dict[str, Any]) -> npt.NDArray[np.float32]:
    # HU mean the same on every scanner: a fixed window, -200..350 HU to 0..1.
    record["clip_hu"] = [-200.0, 350.0]
    out = np.add(a, 200.0)  # (a + 200) / 550 clipped, one array: a 0.8 mm CT is 500 MB
    np.divide(out, 550.0, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def _ct_range(a: npt.NDArray[np.float32], window: Window,
              record: dict[str, Any]) -> npt.NDArray[np.float32]:
    if window is None:
        raise ValueError("intensity preset ct_range needs an intensity_window (HU low, high)")
    lo, hi = window
    record["clip_hu"] = [float(lo), float(hi)]
    out = np.subtract(a, lo)
    np.divide(out, hi - lo, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def _mr_t1(a: npt.NDArray[np.float32], window: Window,
           record: dict[str, Any]) -> npt.NDArray[np.float32]:
    # T1 units are arbitrary: scale by a robust per-volume maximum of the foreground.
    fg = a[a > 0]
    hi = float(np.percentile(fg, 99.5)) if fg.size else 1.0
    record["percentile_99_5"] = round(hi, 6)
    out = np.divide(a, max(hi, 1e-6))
    return np.clip(out, 0.0, 1.5, out=out)


INTENSITY_PRESETS: dict[str, IntensityPreset] = {
    p.name: p
    for p in (
        IntensityPreset("ct_pancreas", "CT", -1000.0, _ct_pancreas,
                        description="CT: clip (HU + 200) / 550 to 0..1 (-200..350 HU)"),
        IntensityPreset("ct_range", "CT", -1000.0, _ct_range, needs_window=True,
                        description="CT: the contract's intensity_window (HU) mapped to 0..1"),
        IntensityPreset("mr_t1", "MR", 0.0, _mr_t1,
                        description="MR: divide by the foreground's 99.5th percentile, "
                                    "clip 0..1.5"),
    )
}


def intensity_preset(name: str) -> IntensityPreset:
    """The preset of that exact name; an unknown name is refused, never guessed."""
    try:
        return INTENSITY_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(INTENSITY_PRESETS))
        raise ValueError(f"unknown intensity preset {name!r} (known: {known})") from None


def background(name: str) -> float:
    """What a preset's resampling fills outside the source: air for CT, zero for MR."""
    return intensity_preset(name).background


def normalise(arr: npt.NDArray[Any], preset: str, window: Window = None,
              record: dict[str, Any] | None = None) -> npt.NDArray[np.float32]:
    """Network-input intensities of ``arr`` (scanner units) under a named preset.

    ``arr`` is only read (a read-only view of an image will do); the result is new.
    """
    a = arr.astype(np.float32, copy=False)
    return intensity_preset(preset).apply(a, window, {} if record is None else record)

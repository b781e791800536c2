"""Declared step presets per modality, built from a typed configuration.

A pipeline names a preset and overrides what its model needs (target spacing,
window, crop margin, 2D size); nothing here is code from configuration. The
defaults resample to a grid no coarser than typical source data, so that the
inverse is exact (see ``pipelines.preprocess.core``); a coarser grid is a
deliberate choice a model makes and costs some boundary accuracy on the way back.

A name that is also an intensity preset (``ct_pancreas``, ``mr_t1``) applies
that preset's maths (``pipelines.preprocess.intensity``), the one the model
packages name; other intensity choices have names of their own
(``ct_pancreas_window`` L50/W150, ``ct_abdomen`` L40/W350, ``mr_t1_zscore``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypedDict, Unpack

from pydantic import BaseModel, ConfigDict, Field

from pipelines.preprocess.core import Preprocessor, Step
from pipelines.preprocess.intensity import background
from pipelines.preprocess.steps import (
    AdaptiveHistogramEqualisation,
    CropToRoi,
    Intensity,
    N4BiasCorrection,
    Reorient,
    ResampleToSpacing,
    Resize2D,
    Window,
    ZScore,
)
from storage.errors import ConfigError

__all__ = [
    "ABDOMEN_WINDOW",
    "PANCREAS_WINDOW",
    "PRESETS",
    "PreprocessConfig",
    "build",
    "ct_abdomen",
    "ct_pancreas",
    "ct_pancreas_window",
    "for_modality",
    "mr_t1",
    "mr_t1_zscore",
]

PANCREAS_WINDOW = (50.0, 150.0)  # level, width (HU)
ABDOMEN_WINDOW = (40.0, 350.0)

Spacing = tuple[float | None, float | None, float | None]
CT_SPACING: Spacing = (0.8, 0.8, 2.0)  # no coarser than typical abdominal CT
MR_SPACING: Spacing = (0.8, 0.8, 0.8)


class PreprocessConfig(BaseModel):
    """What a pipeline's configuration may say about its preprocessing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["ct_pancreas", "ct_pancreas_window", "ct_abdomen", "mr_t1", "mr_t1_zscore"]
    orientation: str = Field(default="LPS", pattern=r"^[LRPAIS]{3}$")
    target_spacing: Spacing | None = None  # None: the preset's default
    window: tuple[float, float] | None = None  # (level, width) HU, window presets only
    crop_margin_mm: float | None = Field(default=None, ge=0)  # None: no ROI crop step
    crop_foreground_threshold: float | None = None
    n4: bool = False  # MR only
    clahe: bool = False
    resize: tuple[int, int] | None = None  # (rows, cols) for 2D models


class Options(TypedDict, total=False):
    """What every declared preset accepts besides its spacing and its own knob."""

    orientation: str  # DICOMOrient axis codes, "LPS" by default
    crop_margin_mm: float | None  # None: no ROI crop step
    crop_foreground_threshold: float | None
    clahe: bool
    resize: tuple[int, int] | None  # (rows, cols) for 2D models


def _declared(
    name: str,
    intensity: Step,
    target_spacing: Spacing | None,
    fill: float,
    *,
    n4: bool = False,
    orientation: str = "LPS",
    crop_margin_mm: float | None = None,
    crop_foreground_threshold: float | None = None,
    clahe: bool = False,
    resize: tuple[int, int] | None = None,
) -> Preprocessor:
    steps: list[Step] = [Reorient(orientation)]
    if n4:
        # Before resampling: the field is smooth, and fitting it costs less on the source grid.
        steps.append(N4BiasCorrection())
    if target_spacing is not None:
        steps.append(ResampleToSpacing(target_spacing, default=fill))
    if crop_margin_mm is not None:
        steps.append(
            CropToRoi(margin_mm=crop_margin_mm, foreground_threshold=crop_foreground_threshold)
        )
    # After the crop, so a foreground threshold in HU still means HU.
    steps.append(intensity)
    if clahe:
        steps.append(AdaptiveHistogramEqualisation())
    if resize is not None:
        steps.append(Resize2D(rows=resize[0], cols=resize[1]))
    return Preprocessor(steps, name=name)


def ct_pancreas(
    *, target_spacing: Spacing | None = CT_SPACING, **options: Unpack[Options]
) -> Preprocessor:
    """Abdominal CT, the shipped pancreas models' maths: clip (HU + 200) / 550 to 0..1."""
    return _declared("ct_pancreas", Intensity("ct_pancreas"), target_spacing,
                     background("ct_pancreas"), **options)


def ct_pancreas_window(
    *,
    target_spacing: Spacing | None = CT_SPACING,
    window: tuple[float, float] = PANCREAS_WINDOW,
    **options: Unpack[Options],
) -> Preprocessor:
    """Abdominal CT in the radiologists' pancreas window L50/W150 HU (not what the
    shipped models were trained on: that is ``ct_pancreas``)."""
    return _declared("ct_pancreas_window", Window(level=window[0], width=window[1]),
                     target_spacing, -1024.0, **options)


def ct_abdomen(
    *,
    target_spacing: Spacing | None = CT_SPACING,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    **options: Unpack[Options],
) -> Preprocessor:
    """Abdominal CT, soft-tissue window L40/W350 HU."""
    return _declared("ct_abdomen", Window(level=window[0], width=window[1]), target_spacing,
                     -1024.0, **options)


def mr_t1(
    *, target_spacing: Spacing | None = MR_SPACING, n4: bool = False,
    **options: Unpack[Options],
) -> Preprocessor:
    """T1 MR, the shipped pancreas models' maths: divide by the foreground's 99.5th
    percentile, clip 0..1.5 (optional N4 bias correction first)."""
    return _declared("mr_t1", Intensity("mr_t1"), target_spacing, background("mr_t1"),
                     n4=n4, **options)


def mr_t1_zscore(
    *, target_spacing: Spacing | None = MR_SPACING, n4: bool = False,
    **options: Unpack[Options],
) -> Preprocessor:
    """T1 MR: optional N4 bias correction, then z-score over the foreground (nnU-Net's
    MR normalisation; not what the shipped models were trained on: that is ``mr_t1``)."""
    return _declared("mr_t1_zscore", ZScore(nonzero=True), target_spacing, 0.0, n4=n4,
                     **options)


PRESETS: dict[str, Callable[..., Preprocessor]] = {
    "ct_pancreas": ct_pancreas,
    "ct_pancreas_window": ct_pancreas_window,
    "ct_abdomen": ct_abdomen,
    "mr_t1": mr_t1,
    "mr_t1_zscore": mr_t1_zscore,
}
_WINDOWED = ("ct_pancreas_window", "ct_abdomen")


def build(config: PreprocessConfig) -> Preprocessor:
    """The Preprocessor a configuration declares."""
    kwargs: dict[str, object] = {
        "orientation": config.orientation,
        "crop_margin_mm": config.crop_margin_mm,
        "crop_foreground_threshold": config.crop_foreground_threshold,
        "clahe": config.clahe,
        "resize": config.resize,
    }
    if config.target_spacing is not None:
        kwargs["target_spacing"] = config.target_spacing
    if config.preset.startswith("ct_"):
        if config.n4:
            raise ConfigError("preprocess.n4 applies to MR presets only")
        if config.window is not None:
            if config.preset not in _WINDOWED:
                raise ConfigError(
                    f"preprocess.window applies to {' and '.join(_WINDOWED)}, "
                    f"not to {config.preset} (its maths is fixed)"
                )
            kwargs["window"] = config.window
    else:
        if config.window is not None:
            raise ConfigError("preprocess.window applies to CT presets only")
        kwargs["n4"] = config.n4
    return PRESETS[config.preset](**kwargs)


def for_modality(modality: str, config: PreprocessConfig | None = None) -> Preprocessor:
    """The default preprocessing for a modality, or the configured one when it fits."""
    modality = modality.upper()
    if config is not None:
        wants = "CT" if config.preset.startswith("ct_") else "MR"
        if wants != modality:
            raise ConfigError(
                f"preprocess preset {config.preset} is for {wants}, the series is {modality}"
            )
        return build(config)
    if modality == "CT":
        return ct_pancreas()
    if modality == "MR":
        return mr_t1()
    raise ConfigError(f"no preprocessing preset for modality {modality!r}")

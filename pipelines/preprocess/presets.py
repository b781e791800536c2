"""Preprocessing presets per modality, built from a typed configuration.

A pipeline names a preset and overrides what its model needs (target spacing,
window, crop margin, 2D size); nothing here is code from configuration. The
defaults resample to a grid no coarser than typical source data, so that the
inverse is exact (see ``pipelines.preprocess.core``); a coarser grid is a
deliberate choice a model makes and costs some boundary accuracy on the way back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.preprocess.core import Preprocessor, Step
from pipelines.preprocess.steps import (
    AdaptiveHistogramEqualisation,
    CropToRoi,
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
    "for_modality",
    "mr_t1",
]

PANCREAS_WINDOW = (50.0, 150.0)  # level, width (HU)
ABDOMEN_WINDOW = (40.0, 350.0)

Spacing = tuple[float | None, float | None, float | None]


class PreprocessConfig(BaseModel):
    """What a pipeline's configuration may say about its preprocessing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["ct_pancreas", "ct_abdomen", "mr_t1"]
    orientation: str = Field(default="LPS", pattern=r"^[LRPAIS]{3}$")
    target_spacing: Spacing | None = None  # None: the preset's default
    window: tuple[float, float] | None = None  # (level, width) HU, CT only
    crop_margin_mm: float | None = Field(default=None, ge=0)  # None: no ROI crop step
    crop_foreground_threshold: float | None = None
    n4: bool = False  # MR only
    clahe: bool = False
    resize: tuple[int, int] | None = None  # (rows, cols) for 2D models


def _tail(
    steps: list[Step],
    crop_margin_mm: float | None,
    crop_foreground_threshold: float | None,
    resize: tuple[int, int] | None,
) -> list[Step]:
    if crop_margin_mm is not None:
        steps.append(
            CropToRoi(margin_mm=crop_margin_mm, foreground_threshold=crop_foreground_threshold)
        )
    if resize is not None:
        steps.append(Resize2D(rows=resize[0], cols=resize[1]))
    return steps


def _ct(
    name: str,
    window: tuple[float, float],
    *,
    orientation: str,
    target_spacing: Spacing | None,
    crop_margin_mm: float | None,
    crop_foreground_threshold: float | None,
    clahe: bool,
    resize: tuple[int, int] | None,
) -> Preprocessor:
    steps: list[Step] = [Reorient(orientation)]
    if target_spacing is not None:
        steps.append(ResampleToSpacing(target_spacing, default=-1024.0))
    # Crop before windowing so a foreground threshold in HU still means HU.
    _tail(steps, crop_margin_mm, crop_foreground_threshold, None)
    steps.append(Window(level=window[0], width=window[1]))
    if clahe:
        steps.append(AdaptiveHistogramEqualisation())
    _tail(steps, None, None, resize)
    return Preprocessor(steps, name=name)


def ct_pancreas(
    *,
    orientation: str = "LPS",
    target_spacing: Spacing | None = (0.8, 0.8, 2.0),
    window: tuple[float, float] = PANCREAS_WINDOW,
    crop_margin_mm: float | None = None,
    crop_foreground_threshold: float | None = None,
    clahe: bool = False,
    resize: tuple[int, int] | None = None,
) -> Preprocessor:
    """Abdominal CT for pancreas models: pancreas window L50/W150 HU."""
    return _ct(
        "ct_pancreas",
        window,
        orientation=orientation,
        target_spacing=target_spacing,
        crop_margin_mm=crop_margin_mm,
        crop_foreground_threshold=crop_foreground_threshold,
        clahe=clahe,
        resize=resize,
    )


def ct_abdomen(
    *,
    orientation: str = "LPS",
    target_spacing: Spacing | None = (0.8, 0.8, 2.0),
    window: tuple[float, float] = ABDOMEN_WINDOW,
    crop_margin_mm: float | None = None,
    crop_foreground_threshold: float | None = None,
    clahe: bool = False,
    resize: tuple[int, int] | None = None,
) -> Preprocessor:
    """Abdominal CT, soft-tissue window L40/W350 HU."""
    return _ct(
        "ct_abdomen",
        window,
        orientation=orientation,
        target_spacing=target_spacing,
        crop_margin_mm=crop_margin_mm,
        crop_foreground_threshold=crop_foreground_threshold,
        clahe=clahe,
        resize=resize,
    )


def mr_t1(
    *,
    orientation: str = "LPS",
    target_spacing: Spacing | None = (0.8, 0.8, 0.8),
    n4: bool = False,
    crop_margin_mm: float | None = None,
    crop_foreground_threshold: float | None = None,
    clahe: bool = False,
    resize: tuple[int, int] | None = None,
) -> Preprocessor:
    """T1 MR: optional N4 bias correction, then z-score over the foreground."""
    steps: list[Step] = [Reorient(orientation)]
    if n4:
        # Before resampling: the field is smooth, and fitting it costs less on the source grid.
        steps.append(N4BiasCorrection())
    if target_spacing is not None:
        steps.append(ResampleToSpacing(target_spacing, default=0.0))
    _tail(steps, crop_margin_mm, crop_foreground_threshold, None)
    steps.append(ZScore(nonzero=True))
    if clahe:
        steps.append(AdaptiveHistogramEqualisation())
    _tail(steps, None, None, resize)
    return Preprocessor(steps, name="mr_t1")


PRESETS: dict[str, Callable[..., Preprocessor]] = {
    "ct_pancreas": ct_pancreas,
    "ct_abdomen": ct_abdomen,
    "mr_t1": mr_t1,
}


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

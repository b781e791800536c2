"""Modality-specific preprocessing as declared, composable steps with an exact inverse.

    from pipelines.preprocess import ct_pancreas, Preprocessor
    image, provenance = ct_pancreas().forward(volume)        # provenance -> Job.provenance
    mask_on_source = Preprocessor.invert_label(prediction, provenance)  # (slices, rows, cols)

``mask_on_source[k]`` belongs to ``volume.sop_instance_uids[k]``.
"""

from pipelines.preprocess.core import (
    PROVENANCE_VERSION,
    Context,
    Grid,
    Preprocessor,
    Provenance,
    RoiBox,
    Step,
    grid_of,
    reference_image,
)
from pipelines.preprocess.presets import (
    ABDOMEN_WINDOW,
    PANCREAS_WINDOW,
    PRESETS,
    PreprocessConfig,
    build,
    ct_abdomen,
    ct_pancreas,
    for_modality,
    mr_t1,
)
from pipelines.preprocess.steps import (
    AdaptiveHistogramEqualisation,
    ClipScale,
    CropToRoi,
    N4BiasCorrection,
    Reorient,
    ResampleToSpacing,
    Resize2D,
    Window,
    ZScore,
    crop_to_roi,
    resample_to_grid,
)

__all__ = [
    "ABDOMEN_WINDOW",
    "PANCREAS_WINDOW",
    "PRESETS",
    "PROVENANCE_VERSION",
    "AdaptiveHistogramEqualisation",
    "ClipScale",
    "Context",
    "CropToRoi",
    "Grid",
    "N4BiasCorrection",
    "PreprocessConfig",
    "Preprocessor",
    "Provenance",
    "Reorient",
    "ResampleToSpacing",
    "Resize2D",
    "RoiBox",
    "Step",
    "Window",
    "ZScore",
    "build",
    "crop_to_roi",
    "ct_abdomen",
    "ct_pancreas",
    "for_modality",
    "grid_of",
    "mr_t1",
    "reference_image",
    "resample_to_grid",
]

"""The one preprocessing path: declared steps with a recorded forward and its inverse.

A model package's input contract resolves here, and training, jobs and
``ainode evaluate`` all use it, so a model always sees the inputs it was trained on:

    from pipelines.preprocess import ModelInput
    prepared = ModelInput.of(manifest.input).forward(image)            # whole scan
    roi_input = ModelInput.of(manifest.input).forward(image, onto=roi)  # a stage-2 grid
    x = prepared.array()                                               # (z, y, x) float32
    back = prepared.invert_probability(prediction)                     # on the source grid

Declared presets for other uses (``ct_pancreas_window``, ``ct_abdomen``,
``mr_t1_zscore``, crops, 2D resizes) run through the same :class:`Preprocessor`:

    image, provenance = ct_abdomen().forward(volume)       # provenance -> Job.provenance
    mask_on_source = Preprocessor.invert_label(prediction, provenance)  # (slices, rows, cols)

``mask_on_source[k]`` belongs to ``volume.sop_instance_uids[k]``.
"""

from pipelines.preprocess.contract import Contract, ModelInput, Prepared
from pipelines.preprocess.core import (
    PROVENANCE_VERSION,
    Context,
    Preprocessor,
    Provenance,
    RoiBox,
    Step,
)
from pipelines.preprocess.grids import (
    Grid,
    grid_of,
    pixels,
    reference_image,
    resample_like,
    resample_to_spacing,
    roi_grid,
    stack_25d,
)
from pipelines.preprocess.intensity import (
    INTENSITY_PRESETS,
    IntensityPreset,
    background,
    intensity_preset,
    normalise,
)
from pipelines.preprocess.presets import (
    ABDOMEN_WINDOW,
    PANCREAS_WINDOW,
    PRESETS,
    PreprocessConfig,
    build,
    ct_abdomen,
    ct_pancreas,
    ct_pancreas_window,
    for_modality,
    mr_t1,
    mr_t1_zscore,
)
from pipelines.preprocess.steps import (
    AdaptiveHistogramEqualisation,
    ClipScale,
    CropToRoi,
    Intensity,
    N4BiasCorrection,
    Reorient,
    ResampleToGrid,
    ResampleToSpacing,
    Resize2D,
    Window,
    ZScore,
    crop_to_roi,
)

__all__ = [
    "ABDOMEN_WINDOW",
    "INTENSITY_PRESETS",
    "PANCREAS_WINDOW",
    "PRESETS",
    "PROVENANCE_VERSION",
    "AdaptiveHistogramEqualisation",
    "ClipScale",
    "Context",
    "Contract",
    "CropToRoi",
    "Grid",
    "Intensity",
    "IntensityPreset",
    "ModelInput",
    "N4BiasCorrection",
    "Prepared",
    "PreprocessConfig",
    "Preprocessor",
    "Provenance",
    "Reorient",
    "ResampleToGrid",
    "ResampleToSpacing",
    "Resize2D",
    "RoiBox",
    "Step",
    "Window",
    "ZScore",
    "background",
    "build",
    "crop_to_roi",
    "ct_abdomen",
    "ct_pancreas",
    "ct_pancreas_window",
    "for_modality",
    "grid_of",
    "intensity_preset",
    "mr_t1",
    "mr_t1_zscore",
    "normalise",
    "pixels",
    "reference_image",
    "resample_like",
    "resample_to_spacing",
    "roi_grid",
    "stack_25d",
]

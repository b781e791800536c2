"""The demo models' recipes: architecture, input contract and training budget.

One place, because the model packages record exactly these values and the
inference pipeline reads them back from ``model.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    package: str  # folder name under pipelines/weights/
    task: str  # pancreas-localisation | lesion-detection | slice-classification
    arch: str
    params: dict[str, Any]
    modality: str
    preset: str
    spacing: tuple[float, float, float]  # (x, y, z) mm
    patch_zyx: tuple[int, int, int]
    iterations: int
    batch: int
    max_minutes: float
    lr: float = 1e-3
    phases: tuple[float, float] = (0.55, 0.15)  # stage 2: seg-only, frozen-encoder cls
    # stage 2: afterwards, retrain the tumour-type MLP on cached frozen features (0: skip).
    # On random training crops of the body's own cases it did not help (0.1.0, validation
    # seeds 800000-800089: patient AUROC 0.835-0.850 against 0.856 without it); the CT demo
    # now continues the MLP on the inference windows of a set of unseen phantoms (below).
    head_iterations: int = 0
    head_crops_per_case: int = 12
    # stage 2, head fine-tune: train on the windows inference classifies from (every
    # sliding window of the ROI, no augmentation) instead of random augmented crops ...
    head_windows: bool = False
    # ... of a phantom set of its own, seeds [start, stop), never used for the body
    # (None: the body's training set).
    head_seeds: tuple[int, int] | None = None
    head_reset: bool = True  # a fresh MLP; False continues from the trained one
    head_lr: float = 1e-3
    # stage 2: within each tumour type, cases with a lesion under 20 mm are drawn
    # (1 + boost) times as often (see trainers.TrainConfig.small_lesion_boost).
    small_lesion_boost: float = 0.0
    # stage 2: then refine the whole trained model end to end (0: skip) on the body's
    # set plus the phantoms of ``refine_seeds`` [start, stop), a ``window_crops``
    # fraction of the crops placed where inference puts its windows (trainers.TrainConfig)
    refine_iterations: int = 0
    refine_seeds: tuple[int, int] | None = None
    refine_lr: float = 3e-4
    refine_minutes: float = 90.0
    window_crops: float = 0.0
    # train on the first N seeds of the contrast's demo set (None: all of them)
    train_cases: int | None = None
    version: str = "0.1.0-demo"
    labels: list[str] = field(default_factory=list)
    outputs: str = ""


_TYPES = ["normal", "PDAC", "PNET", "IPMN", "other_benign"]

RECIPES: dict[str, Recipe] = {
    "ct-stage1": Recipe(
        "pancreas-ct-stage1", "pancreas-localisation", "stage1_unet",
        {"channels": [8, 16, 32, 64]}, "CT", "ct_pancreas", (3.0, 3.0, 3.0), (32, 48, 64),
        iterations=2000, batch=2, max_minutes=14.0, labels=["background", "pancreas"],
        outputs="softmax over labels; pancreas includes its lesions", train_cases=160,
    ),
    "ct-stage2": Recipe(
        "pancreas-ct-stage2", "lesion-detection", "multitask_fpn3d",
        {"channels": [8, 16, 32, 64], "fpn_channels": 32, "num_classes": 5}, "CT",
        "ct_pancreas", (2.5, 2.5, 2.5), (24, 40, 64), iterations=6300, batch=2,
        # 2100 segmentation-only, 300 frozen-encoder, 3900 end-to-end iterations. The
        # shipped 0.2.0 weights: 0.1.0 (4300 iterations on seeds 0..159) continued 2000
        # end-to-end iterations on seeds 0..399 with the small-lesion boost; validation
        # (seeds 800000-800089) patient AUROC 0.856 -> 0.989, sensitivity >= 10 mm
        # 0.783 -> 0.900.
        max_minutes=95.0, phases=(0.33334, 0.04762), small_lesion_boost=1.0, labels=_TYPES,
        outputs="output 0: lesion logit map (sigmoid); output 1: tumour-type logits (softmax)",
        # 0.3.0: then the tumour-type MLP alone (body and lesion map unchanged) continued
        # 1000 iterations at lr 3e-4 on every inference window of 400 phantoms the body
        # never saw (seeds 400..799), class-balanced, PDAC 3:1. Chosen on validation
        # phantoms (seeds 800000-800179): patient AUROC 0.980 -> 0.983, PDAC vs IPMN
        # 0.913 -> 0.951; a fresh MLP or 3000 iterations at 1e-3 did worse (0.97).
        head_iterations=1000, head_windows=True, head_seeds=(400, 800), head_reset=False,
        head_lr=3e-4,
        # 0.4.0: between the body and the head step, the whole model refined end to end
        # on 800 phantoms (seeds 0..399 and 1000..1399), half the crops placed as
        # inference places its windows on a stage-1-like ROI (the 0.3.0 lesion map missed
        # whole lesions that sat in the ROI's one window; see the model card). On the
        # validation phantoms (seeds 800000-800179 and 850000-850299, 480 cases) patient
        # AUROC 0.978 -> 0.995, sensitivity >= 10 mm 0.91 / 0.95 -> 0.96 / 0.97, FP per
        # volume 0.24 -> 0.19; the head step after it changed the AUROC by less than 0.001
        # (kept: PDAC vs IPMN 0.981 -> 0.984). About 25 min on one thread (0.29 s an
        # iteration).
        refine_iterations=5000, refine_seeds=(1000, 1400), refine_lr=3e-4,
        refine_minutes=75.0, window_crops=0.5, version="0.4.0-demo",
    ),
    "ct-slice": Recipe(
        "pancreas-ct-slice", "slice-classification", "slice_classifier2d",
        {"pool": "gap", "input_size": 150}, "CT", "ct_pancreas", (1.2, 1.2, 2.5),
        (3, 150, 150), iterations=200, batch=16, max_minutes=5.0, labels=_TYPES,
        outputs="tumour-type logits per 2.5D slice (softmax)", train_cases=160,
    ),
    "mr-stage1": Recipe(
        "pancreas-mr-stage1", "pancreas-localisation", "stage1_unet",
        {"channels": [8, 16, 32, 64]}, "MR", "mr_t1", (3.0, 3.0, 3.0), (32, 48, 64),
        iterations=300, batch=2, max_minutes=4.0, labels=["background", "pancreas"],
        outputs="softmax over labels; pancreas includes its lesions",
    ),
    "mr-stage2": Recipe(
        "pancreas-mr-stage2", "lesion-detection", "multitask_fpn3d",
        {"channels": [8, 16, 32, 64], "fpn_channels": 32, "num_classes": 5}, "MR",
        "mr_t1", (2.5, 2.5, 2.5), (24, 40, 64), iterations=1800, batch=2, max_minutes=30.0,
        phases=(0.77778, 0.13889),
        labels=_TYPES,
        outputs="output 0: lesion logit map (sigmoid); output 1: tumour-type logits (softmax)",
    ),
}

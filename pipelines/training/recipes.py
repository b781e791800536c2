"""The demo models' recipes: architecture, input contract and training budget.

One place, because the model packages record exactly these values and the
inference pipeline reads them back from ``model.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HELD_OUT_SOURCES", "RECIPES", "Recipe"]

# Label-map sources no model trains on: the AMOS22 abdomen is the anatomy of the test
# set no weights have seen (pipelines.phantom.randomised draws it for its seeds).
HELD_OUT_SOURCES: tuple[str, ...] = ("amos",)


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
    # more training data, from the randomised-appearance generator
    # (pipelines.phantom.randomised): label maps of every source but HELD_OUT_SOURCES,
    # seeds [start, stop) (the seeds whose map is held out are left out) ...
    randomised_seeds: tuple[int, int] | None = None
    # ... lesions painted into the real TotalSegmentator CT, seeds [start, stop) ...
    realct_seeds: tuple[int, int] | None = None
    # ... the real Siemens series (stage 1 only; see randomised.real_siemens_ct) ...
    siemens_seeds: tuple[int, int] | None = None
    # ... and phantoms of the first generator, seeds [start, stop)
    generator_seeds: tuple[int, int] | None = None
    # stage 2: the sets above are for a last end-to-end refinement (after the head step)
    # of this many iterations at ``refine_lr``; stage 1 trains on them from the start
    randomised_iterations: int = 0
    randomised_minutes: float = 45.0
    # put every input in LPS before resampling (InputContract.reorient); the models
    # before 0.5.0 were trained on the source axes
    reorient: bool = False
    # stage 1: crops may reach past the scan by this fraction of a patch, filled with
    # air, as sliding windows do on a small body in a wide field of view
    air_margin: float = 0.0
    # stage 1: this fraction of the samples cut short inside the gland (partial coverage)
    truncate: float = 0.0
    version: str = "0.1.0-demo"
    labels: list[str] = field(default_factory=list)
    outputs: str = ""


_TYPES = ["normal", "PDAC", "PNET", "IPMN", "other_benign"]

RECIPES: dict[str, Recipe] = {
    "ct-stage1": Recipe(
        "pancreas-ct-stage1", "pancreas-localisation", "stage1_unet",
        {"channels": [16, 32, 64, 128]}, "CT", "ct_pancreas", (3.0, 3.0, 3.0), (32, 48, 64),
        # 0.5.0: no longer on the first generator's images alone (0.1.0: 2000 iterations on
        # seeds 0..159, Dice 0.00 on both real CTs), but on randomised appearance drawn
        # from two label-map sources and the generator's anatomy, the real TotalSegmentator
        # CT with painted lesions, the real Siemens series and 120 generator phantoms;
        # every input put in LPS, crops reaching into air and a third of the stacks cut
        # short inside the gland (a short real series). Twice the channels of 0.1.0.
        iterations=6000, batch=2, max_minutes=45.0, labels=["background", "pancreas"],
        outputs="softmax over labels; pancreas includes its lesions", train_cases=0,
        randomised_seeds=(0, 450), realct_seeds=(0, 60), siemens_seeds=(0, 30),
        generator_seeds=(1000, 1120), reorient=True, air_margin=1.0, truncate=0.35,
        version="0.5.0-demo",
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
        refine_minutes=75.0, window_crops=0.5,
        # Tried on 2026-12-03 and not shipped: the 0.4.0 model refined end to end for 4000
        # iterations (41 min) on the randomised sets below (randomised_iterations=4000).
        # With the 0.5.0 stage 1 it measured worse on the first generator's fresh seeds
        # 930000-930029 (patient AUROC 0.889 against 0.954, sensitivity >= 10 mm 0.79
        # against 0.89) and no better than chance on fresh randomised seeds 970000-970089
        # (AUROC 0.52; 0.4.0: 0.44): too little training to learn the randomised domain,
        # and it said "assessed" on more cases it could not judge. 0 skips the step.
        randomised_seeds=(0, 450), realct_seeds=(0, 60), generator_seeds=(1000, 1120),
        randomised_iterations=0, randomised_minutes=45.0, version="0.4.0-demo",
    ),
    "ct-slice": Recipe(
        "pancreas-ct-slice", "slice-classification", "slice_classifier2d",
        {"pool": "gap", "input_size": 150}, "CT", "ct_pancreas", (1.2, 1.2, 2.5),
        (3, 150, 150), iterations=200, batch=16, max_minutes=5.0, labels=_TYPES,
        outputs="tumour-type logits per 2.5D slice (softmax)", train_cases=160,
    ),
    "mr-stage1": Recipe(
        "pancreas-mr-stage1", "pancreas-localisation", "stage1_unet",
        {"channels": [16, 32, 64, 128]}, "MR", "mr_t1", (3.0, 3.0, 3.0), (32, 48, 64),
        # 0.2.0: the CT stage 1 recipe on MR (0.1.0: 300 iterations on 60 first-generator
        # phantoms): randomised MR contrasts (T1, T2, in/opposed phase, post-contrast)
        # with bias fields and Rician noise, drawn on the generator's anatomy and the
        # TotalSegmentator label map (AMOS held out), plus 80 first-generator phantoms;
        # inputs in LPS, crops reaching into air, a third of the stacks cut short.
        iterations=4000, batch=2, max_minutes=40.0, labels=["background", "pancreas"],
        outputs="softmax over labels; pancreas includes its lesions", train_cases=0,
        randomised_seeds=(0, 300), generator_seeds=(1000, 1080), reorient=True,
        air_margin=1.0, truncate=0.35, version="0.2.0-demo",
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

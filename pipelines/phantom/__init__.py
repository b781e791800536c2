"""Synthetic abdominal phantoms (CT and T1-MR) for demo weights, tests and evaluation.

``generator`` draws the original phantoms (the shipped weights were trained on them);
``randomised`` paints SynthSeg-style images from label maps (``labelmaps``: the
generator's anatomy and the real AMOS22 / TotalSegmentator maps) with every
appearance parameter drawn per case: a second appearance model for training that
generalises and for test sets the current weights never saw.
"""

from pipelines.phantom.generator import (
    DIAGNOSES,
    Phantom,
    PhantomSpec,
    generate,
    generate_labelmap,
)
from pipelines.phantom.io import phantom_to_sitk, write_dataset, write_dicom_series
from pipelines.phantom.randomised import (
    RandomisedCase,
    RandomisedSpec,
    synthesise,
    write_randomised_dataset,
)

__all__ = [
    "DIAGNOSES",
    "Phantom",
    "PhantomSpec",
    "RandomisedCase",
    "RandomisedSpec",
    "generate",
    "generate_labelmap",
    "phantom_to_sitk",
    "synthesise",
    "write_dataset",
    "write_dicom_series",
    "write_randomised_dataset",
]

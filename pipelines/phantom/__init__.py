"""Synthetic abdominal phantoms (CT and T1-MR) for demo weights, tests and evaluation."""

from pipelines.phantom.generator import DIAGNOSES, Phantom, PhantomSpec, generate
from pipelines.phantom.io import phantom_to_sitk, write_dataset, write_dicom_series

__all__ = [
    "DIAGNOSES",
    "Phantom",
    "PhantomSpec",
    "generate",
    "phantom_to_sitk",
    "write_dataset",
    "write_dicom_series",
]

"""``ainode-keyimages``: a third-party pipeline and output kind, as a hospital would add one.

It is the smallest complete plug-in: the ``brightest-slice`` pipeline (the
slice with the highest mean intensity, found with no model at all) and a
``KOS`` writer that flags that slice in a DICOM Key Object Selection
Document. It is laid out as every pipeline is (``preprocess.py``,
``model.py``, ``output.py``) and reaches the node only through its entry
points (``ainode.pipelines`` and ``ainode.writers``), published by
``tests.plugins.publish``: nothing in ``node``, ``pipelines`` or ``storage``
names it.
"""

from __future__ import annotations

from pathlib import Path

from ainode_keyimages.model import BrightestSlice

__all__ = ["BrightestSlice", "brightest_slice"]


def brightest_slice(*, models_dir: Path | None, device: str) -> BrightestSlice:
    """The ``ainode.pipelines`` entry point: no model to load, so both are only recorded."""
    return BrightestSlice(models_dir=models_dir, device=device)

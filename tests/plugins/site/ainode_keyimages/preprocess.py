"""The pipeline's input: the volume's pixels as float, one row per source slice."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipelines.volume import Volume

__all__ = ["slice_means"]


def slice_means(volume: Volume) -> npt.NDArray[np.float64]:
    """Mean intensity per source slice (axis 0 is the source slice order)."""
    array = np.asarray(volume.array, dtype=np.float64)
    return array.reshape(array.shape[0], -1).mean(axis=1)

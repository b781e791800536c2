"""What each pancreas model sees: its package's input contract, on the grid its stage uses.

Why one room: the region rules (the gland box plus a margin, at least one
patch; the slice classifier's fixed in-plane field) decide what a network
sees as much as the intensity preset does, and training must cut its samples
by the same rules the pipeline uses at inference. ``pipelines.training.data``
and :mod:`pipelines.pancreas.model` both call these functions; the
resampling and intensity maths themselves are ``pipelines.preprocess``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
import torch

from pipelines.models.package import InputContract, LoadedModel
from pipelines.preprocess import ModelInput, Prepared, roi_grid, stack_25d

__all__ = ["model_input", "slice_roi", "slice_stack", "stage2_roi"]


def stage2_roi(mask: npt.NDArray[np.bool_], grid: sitk.Image, *, margin_mm: float,
               spacing: Sequence[float], patch_zyx: Sequence[int],
               min_extra: int = 0) -> sitk.Image:
    """Stage 2's grid: the gland's box plus ``margin_mm``, at least a patch (+ ``min_extra``)."""
    return roi_grid(mask, grid, margin_mm=margin_mm, spacing=spacing,
                    min_size=tuple(int(p) + min_extra for p in patch_zyx[::-1]))


def slice_roi(mask: npt.NDArray[np.bool_], grid: sitk.Image, *, margin_mm: float,
              spacing: Sequence[float], size: int) -> sitk.Image:
    """The slice classifier's grid: the gland's slices, a fixed ``size`` x ``size`` field."""
    return roi_grid(mask, grid, margin_mm=margin_mm, spacing=spacing,
                    min_size=(size, size, 3), exact_xy=size)


def model_input(img: sitk.Image, model: LoadedModel,
                onto: sitk.Image | None = None) -> tuple[torch.Tensor, Prepared]:
    """The network's (1, 1, z, y, x) input on its device, and the record that maps back."""
    prepared = ModelInput.of(model.manifest.input).forward(img, onto=onto)
    x = torch.as_tensor(prepared.array(), dtype=torch.float32)[None, None].to(model.device)
    return x, prepared


def slice_stack(img: sitk.Image, contract: InputContract,
                onto: sitk.Image) -> npt.NDArray[np.float32]:
    """The 2.5D stack (z, 3, y, x) of ``img`` on ``onto``: each slice with its neighbours."""
    return stack_25d(ModelInput.of(contract).forward(img, onto=onto).array())

"""Gradient attribution of a classification head: Grad-CAM on the last encoder levels.

Why Grad-CAM (Selvaraju et al. 2017) through MONAI's ``GradCAM``, a kept
implementation, rather than our own: the map is evidence shown to readers,
so its maths should be the one others have checked. Why several encoder
levels: the stage-2 head fuses the last three (a feature pyramid); the
coarsest alone is a handful of voxels across a region of interest, and a
small lesion is visible only at the finer ones. Each level's map is
upsampled to the input grid by MONAI and normalised by :func:`above_median`
(MONAI's ``postprocessing`` hook); their mean, divided by its maximum, is the
attribution (1: the strongest evidence in the region).

Why above the median and not MONAI's min-max: on the stage-2 network the
class-activation map is high almost everywhere in the region (measured on
phantoms: min-max maps averaged 0.8-0.95), so a min-max overlay paints the
whole region and shows nothing; the part above the region's median is what
sets places apart. Values at or below the median are 0.

A map is evidence only if it depends on the model and on the input
(Adebayo et al. 2018, "Sanity checks for saliency maps"); the tests check
that it changes when the weights are randomised and when the lesion is
removed from the input, and that it differs between cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["ClassifierOutput", "above_median", "grad_cam", "spearman"]


def above_median(cam: torch.Tensor) -> torch.Tensor:
    """Per map: (value - median) / (max - median), clipped to 0..1 (0 for a flat map)."""
    flat = cam.detach().flatten(1)
    med = flat.median(dim=1).values
    top = flat.amax(dim=1)
    shape = (-1,) + (1,) * (cam.dim() - 1)
    span = (top - med).clamp_min(1e-12).view(shape)
    return ((cam.detach() - med.view(shape)) / span).clamp(0.0, 1.0)


class ClassifierOutput(nn.Module):
    """A multi-output network seen as its classification logits only (what GradCAM wants).

    ``index`` picks the logits from a tuple output (stage 2 returns (lesion
    logits, tumour-type logits)); the network is kept as ``net``, so its layers
    are named ``net.<name>`` here.
    """

    def __init__(self, net: nn.Module, index: int = 1) -> None:
        super().__init__()
        self.net = net
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, tuple | list):
            out = out[self.index]
        assert isinstance(out, torch.Tensor)
        return out


def grad_cam(net: nn.Module, x: torch.Tensor, *, class_index: int,
             layers: Sequence[str], output_index: int = 1) -> npt.NDArray[np.float32]:
    """Grad-CAM of logit ``class_index`` on ``layers`` of ``net``: (z, y, x) on x's grid, 0..1.

    ``x`` is one input, (1, channels, z, y, x). Runs outside inference mode
    with gradients on (the caller's no-grad context is lifted here) and leaves
    the network's parameters and mode as they were.
    """
    from monai.visualize import GradCAM

    if x.shape[0] != 1:
        raise ValueError(f"one input at a time, not a batch of {x.shape[0]}")
    wrapped = ClassifierOutput(net, output_index)
    names = [f"net.{name}" for name in layers]
    was_training = net.training
    net.eval()
    maps = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            xin = x.detach().clone().float().requires_grad_(False)
            cam = GradCAM(nn_module=wrapped, target_layers=names,  # type: ignore[arg-type]
                          postprocessing=above_median)
            for i in range(len(names)):
                m = cam(xin, class_idx=class_index, layer_idx=i)
                maps.append(m.detach().float().cpu().numpy()[0, 0])
    finally:
        net.train(was_training)
        net.zero_grad(set_to_none=True)
    mean = np.mean(maps, axis=0)
    hi = float(mean.max())
    out = mean / hi if hi > 0 else np.zeros_like(mean)
    return np.asarray(np.clip(out, 0.0, 1.0), np.float32)


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation of two maps (flattened): the similarity Adebayo et al. use."""
    from scipy.stats import spearmanr

    av, bv = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if av.shape != bv.shape:
        raise ValueError(f"maps of different shapes: {av.shape} and {bv.shape}")
    if av.std() == 0 or bv.std() == 0:
        return 1.0 if np.array_equal(av, bv) else 0.0
    return float(spearmanr(av, bv).statistic)

"""The networks, built from MONAI blocks, and the registry that names them.

A model package names its architecture and parameters (``model.yaml``); the
loader builds it through ``build(name, params)``. Names, never code, in the
manifest: a package cannot make the node execute anything but these classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn

from storage.errors import ModelError

__all__ = ["ARCHITECTURES", "MultiTaskNet3D", "SliceClassifier2D", "build", "stage1_unet"]


def stage1_unet(
    channels: Sequence[int] = (8, 16, 32, 64),
    in_channels: int = 1,
    out_channels: int = 2,
    num_res_units: int = 1,
) -> nn.Module:
    """Stage 1: a plain MONAI 3D U-Net for the pancreas at low resolution."""
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple([2] * (len(channels) - 1)),
        num_res_units=num_res_units,
        norm="instance",
    )


class MultiTaskNet3D(nn.Module):
    """Stage 2: shared encoder, a lesion decoder and an FPN classification head.

    The classification head fuses the last three encoder levels top-down (a
    feature pyramid) before pooling, because a small hypo-attenuating lesion
    is visible at the finer of those levels while the gland's context (duct
    dilation, contour) lives at the coarsest.
    """

    def __init__(
        self,
        channels: Sequence[int] = (8, 16, 32, 64),
        in_channels: int = 1,
        seg_channels: int = 1,
        num_classes: int = 5,
        fpn_channels: int = 32,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if len(channels) < 3:
            raise ValueError("the FPN head needs at least three encoder levels")
        self.channels = tuple(channels)
        self.enc = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(channels):
            self.enc.append(nn.Sequential(
                Convolution(3, prev, ch, strides=1 if i == 0 else 2, norm="instance"),
                ResidualUnit(3, ch, ch, norm="instance"),
            ))
            prev = ch
        self.dec = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.dec.append(nn.Sequential(
                Convolution(3, channels[i] + channels[i - 1], channels[i - 1], norm="instance"),
                ResidualUnit(3, channels[i - 1], channels[i - 1], norm="instance"),
            ))
        self.seg_head = nn.Conv3d(channels[0], seg_channels, kernel_size=1)
        top = channels[-3:]
        self.lateral = nn.ModuleList(nn.Conv3d(c, fpn_channels, 1) for c in top)
        # No instance norm here: it would remove each map's mean and scale, i.e. exactly
        # the global evidence a patient-level head pools.
        self.smooth = nn.ModuleList(
            Convolution(3, fpn_channels, fpn_channels, norm=None) for _ in top
        )
        self.cls_head = nn.Sequential(
            # Leaky: a dead ReLU layer here silently turns the head into a constant prior.
            nn.Linear(3 * 3 * fpn_channels, 64), nn.LeakyReLU(0.1), nn.Dropout(dropout),
            nn.Linear(64, num_classes),
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.enc for p in m.parameters()]

    def reset_classifier(self) -> None:
        """Fresh classification head (before training it on a segmentation-trained encoder)."""
        for mod in [*self.lateral, *self.smooth, self.cls_head]:
            for m in mod.modules():
                if m is not mod and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()

    def classifier_parameters(self) -> list[nn.Parameter]:
        mods: list[nn.Module] = [*self.lateral, *self.smooth, self.cls_head]
        return [p for m in mods for p in m.parameters()]

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder levels and the lesion logit map: everything the classifier reads."""
        feats = []
        h = x
        for blk in self.enc:
            h = blk(h)
            feats.append(h)
        d = feats[-1]
        for j, blk in enumerate(self.dec):
            skip = feats[-2 - j]
            d = F.interpolate(d, size=skip.shape[2:], mode="trilinear", align_corners=False)
            d = blk(torch.cat([d, skip], dim=1))
        return feats, self.seg_head(d)

    def classify(self, top: Sequence[torch.Tensor], seg: torch.Tensor) -> torch.Tensor:
        """Tumour-type logits from the last three encoder levels and the lesion logits.

        Split from ``forward`` so the head can be trained on cached encoder features.
        """
        return self.cls_head(self.pooled_features(top, seg))

    def pooled_features(self, top: Sequence[torch.Tensor], seg: torch.Tensor) -> torch.Tensor:
        """The pooled pyramid vector the classification head reads, (batch, 9 * fpn).

        Split from :meth:`classify` so the pipeline's competence check can measure
        how far a case lies from the training distribution in exactly the space the
        head decides in; the head's output is unchanged by the split.
        """
        lat = [lat_conv(f) for lat_conv, f in zip(self.lateral, top, strict=True)]
        p = lat[-1]
        pyramid = [self.smooth[-1](p)]
        for k in range(len(lat) - 2, -1, -1):
            p = lat[k] + F.interpolate(p, size=lat[k].shape[2:], mode="trilinear",
                                       align_corners=False)
            pyramid.append(self.smooth[k](p))
        # Three poolings per level: mean (context: duct, contour), max (the strongest
        # local evidence) and the mean under the lesion map (the lesion's own texture and
        # density, which is what tells the tumour types apart).
        attn = torch.sigmoid(seg.detach())
        pooled = []
        for q in pyramid:
            w = F.interpolate(attn, size=q.shape[2:], mode="trilinear", align_corners=False)
            wsum = w.sum(dim=(2, 3, 4)).clamp_min(1e-3)
            pooled.append(torch.cat([
                q.mean(dim=(2, 3, 4)), q.amax(dim=(2, 3, 4)),
                (q * w).sum(dim=(2, 3, 4)) / wsum,
            ], 1))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, seg = self.features(x)
        return seg, self.classify(feats[-3:], seg)

    def forward_with_features(
        self, x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` plus the pooled features: (lesion logits, type logits, features)."""
        feats, seg = self.features(x)
        pooled = self.pooled_features(feats[-3:], seg)
        return seg, self.cls_head(pooled), pooled


class SliceClassifier2D(nn.Module):
    """The 2.5D slice classifier: 3 adjacent slices in, 5 tumour-type logits out.

    Four double-convolution blocks (32-64-128-256, batch norm, dropout 0.25)
    and dense layers 512-256 (dropout 0.5), as published. ``pool="gap"``
    (global average pooling before the dense layers) keeps the weights at a
    few MB; ``pool="flatten"`` is the original 150x150 flatten (about 42 MB).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        filters: Sequence[int] = (32, 64, 128, 256),
        dense: Sequence[int] = (512, 256),
        input_size: int = 150,
        pool: str = "gap",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        size = input_size
        for f in filters:
            layers += [
                nn.Conv2d(prev, f, 3, padding=1), nn.BatchNorm2d(f), nn.ReLU(inplace=True),
                nn.Conv2d(f, f, 3, padding=1), nn.BatchNorm2d(f), nn.ReLU(inplace=True),
                nn.MaxPool2d(2), nn.Dropout2d(0.25),
            ]
            prev = f
            size //= 2
        self.features = nn.Sequential(*layers)
        if pool == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            flat = prev
        elif pool == "flatten":
            self.pool = nn.Identity()
            flat = prev * size * size
        else:
            raise ValueError(f"pool must be 'gap' or 'flatten', not {pool!r}")
        head: list[nn.Module] = []
        for d in dense:
            head += [nn.Linear(flat, d), nn.ReLU(inplace=True), nn.Dropout(0.5)]
            flat = d
        head.append(nn.Linear(flat, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "stage1_unet": stage1_unet,
    "multitask_fpn3d": MultiTaskNet3D,
    "slice_classifier2d": SliceClassifier2D,
}


def build(name: str, params: dict[str, Any] | None = None) -> nn.Module:
    """The registered architecture ``name`` with ``params``; unknown names are refused."""
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {name!r}; known: {known}")
    try:
        return ARCHITECTURES[name](**(params or {}))
    except TypeError as exc:
        raise ModelError(f"bad parameters for architecture {name!r}: {exc}") from exc

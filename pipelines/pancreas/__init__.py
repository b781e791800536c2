"""Pancreas pipelines: two-stage lesion detection/classification plus a slice classifier.

Importing this package registers ``pancreas-ct`` and ``pancreas-mr`` with the
shipped demo weights (``pipelines/weights``). A deployment with its own models
builds :class:`PancreasPipeline` from its packages instead.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.pancreas.pipeline import SHIPPED_WEIGHTS, PancreasPipeline, PipelineSettings
from pipelines.registry import register

__all__ = ["PancreasPipeline", "PipelineSettings", "build_pipeline"]


def build_pipeline(name: str, models_dir: Path | None = None, *, device: str = "auto",
                   settings: PipelineSettings | None = None) -> PancreasPipeline:
    """``pancreas-ct`` or ``pancreas-mr`` from the packages in ``models_dir``.

    The slice classifier joins ``pancreas-ct`` when its package is present.
    """
    root = models_dir or SHIPPED_WEIGHTS
    prefix = {"pancreas-ct": "pancreas-ct", "pancreas-mr": "pancreas-mr"}[name]
    p = PancreasPipeline.from_packages(
        name, root / f"{prefix}-stage1", root / f"{prefix}-stage2", root / f"{prefix}-slice",
        device=device, settings=settings,
    )
    return p


@register("pancreas-ct")
def _pancreas_ct() -> PancreasPipeline:
    return build_pipeline("pancreas-ct")


@register("pancreas-mr")
def _pancreas_mr() -> PancreasPipeline:
    return build_pipeline("pancreas-mr")

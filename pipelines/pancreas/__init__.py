"""Pancreas pipelines: two-stage lesion detection/classification plus a slice classifier.

``pancreas_ct`` and ``pancreas_mr`` are the factories published in the
``ainode.pipelines`` entry-point group (pyproject.toml). Each stage loads the
package of its name (``pancreas-ct-stage1``, ``-stage2``, ``-slice``) from
``inference.models_dir`` when that folder has it, else the shipped demo
package (``pipelines/weights``), and the result's provenance says which, so a
site that imported its own model can see that a job ran it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.models.package import FoundPackage, locate_package
from pipelines.pancreas.model import SHIPPED_WEIGHTS, PancreasPipeline, PipelineSettings
from storage.errors import ModelError

log = logging.getLogger(__name__)

__all__ = [
    "PancreasFactory",
    "PancreasPipeline",
    "PipelineSettings",
    "build_pipeline",
    "model_packages",
    "pancreas_ct",
    "pancreas_mr",
]

PIPELINES = ("pancreas-ct", "pancreas-mr")
STAGES = ("stage1", "stage2", "slice")  # the slice classifier is optional
_REQUIRED = ("stage1", "stage2")


def model_packages(name: str, models_dir: Path | None = None) -> dict[str, FoundPackage | None]:
    """Per stage, the package ``name`` loads with ``models_dir`` (None: neither folder has it)."""
    if name not in PIPELINES:
        raise ModelError(f"unknown pancreas pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return {stage: locate_package(f"{name}-{stage}", models_dir, SHIPPED_WEIGHTS)
            for stage in STAGES}


def build_pipeline(name: str, models_dir: Path | None = None, *, device: str = "auto",
                   settings: PipelineSettings | None = None) -> PancreasPipeline:
    """``pancreas-ct`` or ``pancreas-mr`` from the packages in ``models_dir``, stage by stage.

    A stage whose package ``models_dir`` lacks falls back to the shipped one
    (logged, and recorded in the provenance); a package that is present but
    refused (bad hash, bad manifest) is an error, never silently replaced.
    """
    found = model_packages(name, models_dir)
    missing = [f"{name}-{s}" for s in _REQUIRED if found[s] is None]
    if missing:
        where = f"{models_dir} or {SHIPPED_WEIGHTS}" if models_dir else str(SHIPPED_WEIGHTS)
        raise ModelError(f"{name}: no package {', '.join(missing)} in {where}")
    if models_dir is not None:
        if not Path(models_dir).is_dir():
            log.warning("inference.models_dir does not exist; every stage uses the shipped "
                        "demo packages", extra={"pipeline": name, "models_dir": str(models_dir)})
        for stage, pkg in found.items():
            if pkg is not None and pkg.source == "shipped":
                log.warning("model package missing from inference.models_dir; using the "
                            "shipped demo package", extra={
                                "pipeline": name, "stage": stage, "package": pkg.name,
                                "models_dir": str(models_dir)})
    s1, s2, sc = (found[s] for s in STAGES)
    assert s1 is not None and s2 is not None
    p = PancreasPipeline.from_packages(name, s1.path, s2.path, sc.path if sc else None,
                                       device=device, settings=settings)
    p.model_sources = _provenance(found, models_dir)
    return p


def _provenance(found: dict[str, FoundPackage | None], models_dir: Path | None) -> dict[str, Any]:
    """Flat strings: the job row keeps only the scalar values of a result's provenance."""
    out: dict[str, Any] = {f"{stage}_source": pkg.source
                           for stage, pkg in found.items() if pkg is not None}
    if models_dir is not None:
        out["models_dir"] = str(models_dir)
    return out


@dataclass(frozen=True)
class PancreasFactory:
    """The registry's factory for one pancreas pipeline (an entry point of ``ainode.pipelines``)."""

    pipeline: str

    def __call__(self, *, models_dir: Path | None = None,
                 device: str = "auto") -> PancreasPipeline:
        return build_pipeline(self.pipeline, models_dir, device=device)

    def packages(self, models_dir: Path | None = None) -> dict[str, FoundPackage | None]:
        return model_packages(self.pipeline, models_dir)


pancreas_ct = PancreasFactory("pancreas-ct")
pancreas_mr = PancreasFactory("pancreas-mr")

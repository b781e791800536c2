"""Fit the competence statistics of a stage-2 model: what its training data look like to it.

Why: the pipeline's competence check (``pipelines.pancreas.applicability``)
refuses a case whose pooled stage-2 features (what the classification head
decides on) lie far from those of the data the model was trained on, because
there the model's answers mean nothing. This module fits those statistics on
training-generator phantoms, through the pipeline's own code path
(:meth:`PancreasPipeline.case_features`), sets the threshold at a high
percentile of the distances of *validation* phantoms (never the fitting ones:
their distances are optimistically small), and writes them into the model
package: ``competence.npz`` beside the weights, declared with its sha256 in
``model.yaml``.

The distance is a Mahalanobis distance of the standardised features with a
Ledoit-Wolf shrunk covariance: a few hundred cases against a 288-dimensional
feature vector would give a singular sample covariance.

    python -m pipelines.training.competence --pipeline pancreas-ct \\
        --fit 0:200 --validate 800000:800180 --write pipelines/weights/pancreas-ct-stage2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "COMPETENCE_FILE",
    "CompetenceFit",
    "collect_features",
    "fit_statistics",
    "ledoit_wolf",
    "write_competence",
]

log = logging.getLogger(__name__)

COMPETENCE_FILE = "competence.npz"


def ledoit_wolf(x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
    """Ledoit-Wolf (2004) shrinkage of the sample covariance of ``x`` (n, d) to a scaled identity.

    Returns the shrunk covariance and the shrinkage intensity (0: the sample
    covariance, 1: the identity scaled by the mean variance). The same
    estimator as scikit-learn's ``LedoitWolf`` (not installed here).
    """
    n, d = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / d
    delta = float(((s - mu * np.eye(d)) ** 2).sum()) / d
    x2 = xc ** 2
    beta_ = float((x2.T @ x2).sum() / n - (s ** 2).sum()) / (d * n)
    beta = min(beta_, delta)
    shrink = 0.0 if delta == 0 else beta / delta
    return (1.0 - shrink) * s + shrink * mu * np.eye(d), shrink


@dataclass(frozen=True)
class CompetenceFit:
    """The fitted arrays and the threshold, with what they were fitted on."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    shrinkage: float
    threshold: float
    percentile: float
    fit_distances: npt.NDArray[np.float64]
    validation_distances: npt.NDArray[np.float64]

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"mean": self.mean, "scale": self.scale, "precision": self.precision,
                "threshold": np.asarray(self.threshold)}

    def save(self, path: Path) -> None:
        """The arrays as an uncompressed .npz (what the package loader reads, no pickle)."""
        np.savez(path, mean=self.mean, scale=self.scale, precision=self.precision,
                 threshold=np.asarray(self.threshold))


def fit_statistics(fit: npt.NDArray[np.float64], validation: npt.NDArray[np.float64], *,
                   percentile: float = 99.0) -> CompetenceFit:
    """Statistics from ``fit`` (n, d), threshold at ``percentile`` of ``validation``'s distances."""
    from pipelines.pancreas.applicability import mahalanobis

    if len(fit) < 2 or len(validation) < 1:
        raise ValueError("need at least 2 fitting and 1 validation cases")
    mean = fit.mean(axis=0)
    # A feature constant on the training data (a dead channel) would divide by zero; its
    # scale then becomes the median scale, so any deviation on a new case still counts.
    sd = fit.std(axis=0)
    floor = float(np.median(sd[sd > 0])) if (sd > 0).any() else 1.0
    scale = np.where(sd > 1e-8 * floor, sd, floor)
    z = (fit - mean) / scale
    cov, shrink = ledoit_wolf(z)
    precision = np.asarray(np.linalg.inv(cov), dtype=np.float64)
    stats = {"mean": mean, "scale": scale, "precision": precision}
    fit_d = np.array([mahalanobis(f, stats) for f in fit])
    val_d = np.array([mahalanobis(f, stats) for f in validation])
    threshold = float(np.percentile(val_d, percentile))
    return CompetenceFit(mean, scale, precision, shrink, threshold, percentile, fit_d, val_d)


def collect_features(pipeline: Any, seeds: Iterable[int], contrast: str) -> tuple[
        list[int], npt.NDArray[np.float64], list[dict[str, Any]]]:
    """Each phantom's pooled stage-2 features (seeds where stage 1 finds no gland are left out)."""
    from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk

    used: list[int] = []
    feats: list[npt.NDArray[np.float64]] = []
    records: list[dict[str, Any]] = []
    for seed in seeds:
        ph = generate(PhantomSpec(seed=seed, contrast=contrast))  # type: ignore[arg-type]
        img, _ = phantom_to_sitk(ph)
        f, record = pipeline.case_features(img)
        records.append({"seed": seed, "failed": record.get("applicability_failed")})
        if f is not None:
            used.append(seed)
            feats.append(np.asarray(f, np.float64))
    return used, np.array(feats), records


def _range(text: str) -> range:
    lo, hi = (int(v) for v in text.split(":"))
    return range(lo, hi)


def _describe(r: range) -> str:
    return f"seeds {r.start}..{r.stop - 1}"


def write_competence(pkg: Path, fit: CompetenceFit, *, fitted_on: str, threshold_on: str,
                     details: dict[str, Any]) -> Path:
    """``competence.npz`` into ``pkg`` and its declaration (with sha256) into ``model.yaml``.

    Only the ``competence`` entry of the manifest changes; the weights and
    their hash are left as they are.
    """
    from pipelines.models.package import (
        Competence,
        read_manifest,
        sha256_file,
        verify_package,
        write_manifest,
    )

    verify_package(pkg)
    out = pkg / COMPETENCE_FILE
    tmp = pkg / (COMPETENCE_FILE + ".tmp.npz")
    fit.save(tmp)
    tmp.replace(out)
    manifest = read_manifest(pkg)
    comp = Competence(file=COMPETENCE_FILE, sha256=sha256_file(out),
                      threshold=round(fit.threshold, 4), fitted_on=fitted_on,
                      threshold_on=threshold_on, details=details)
    write_manifest(pkg, manifest.model_copy(update={"competence": comp}))
    verify_package(pkg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default="pancreas-ct", choices=("pancreas-ct", "pancreas-mr"))
    ap.add_argument("--fit", required=True, type=_range, help="fitting seeds LO:HI (training)")
    ap.add_argument("--validate", required=True, type=_range,
                    help="validation seeds LO:HI (set the threshold)")
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--write", type=Path, help="the stage-2 package to write into")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the distances here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from pipelines.pancreas import build_pipeline
    from pipelines.pancreas.model import PipelineSettings

    torch.set_num_threads(1)
    contrast = "ct" if args.pipeline == "pancreas-ct" else "mr_t1"
    pipe = build_pipeline(args.pipeline, device=args.device,
                          settings=PipelineSettings(applicability=False))
    t0 = time.perf_counter()
    fit_seeds, fit_x, fit_rec = collect_features(pipe, args.fit, contrast)
    val_seeds, val_x, val_rec = collect_features(pipe, args.validate, contrast)
    fit = fit_statistics(fit_x, val_x, percentile=args.percentile)
    seconds = round(time.perf_counter() - t0, 1)
    summary = {
        "pipeline": args.pipeline, "stage2": pipe.stage2.manifest.name,
        "stage2_version": pipe.stage2.manifest.version,
        "fit": {"seeds": _describe(args.fit), "cases": len(fit_seeds)},
        "validate": {"seeds": _describe(args.validate), "cases": len(val_seeds)},
        "features": int(fit_x.shape[1]), "shrinkage": round(fit.shrinkage, 4),
        "threshold": round(fit.threshold, 4), "percentile": args.percentile,
        "fit_distance_median": round(float(np.median(fit.fit_distances)), 3),
        "validation_distance_median": round(float(np.median(fit.validation_distances)), 3),
        "validation_distance_max": round(float(fit.validation_distances.max()), 3),
        "anatomy_or_series_failed": [r for r in fit_rec + val_rec if r["failed"]],
        "seconds": seconds,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({
            **summary, "fit_distances": fit.fit_distances.round(4).tolist(),
            "validation_distances": fit.validation_distances.round(4).tolist()}))
    if args.write:
        write_competence(
            args.write, fit,
            fitted_on=f"pooled stage-2 features of {len(fit_seeds)} {contrast} training-"
                      f"generator phantoms, {_describe(args.fit)} (pipelines.phantom), "
                      "through PancreasPipeline.case_features",
            threshold_on=f"{args.percentile:g}th percentile of the distances of "
                         f"{len(val_seeds)} validation phantoms, {_describe(args.validate)}",
            details={"features": int(fit_x.shape[1]), "shrinkage": round(fit.shrinkage, 4),
                     "standardised": True, "estimator": "Ledoit-Wolf",
                     "fit_distance_median": summary["fit_distance_median"],
                     "validation_distance_median": summary["validation_distance_median"],
                     "command": "python -m pipelines.training.competence --pipeline "
                                f"{args.pipeline} --fit {args.fit.start}:{args.fit.stop} "
                                f"--validate {args.validate.start}:{args.validate.stop} "
                                f"--percentile {args.percentile:g} --write {args.write}",
                     "seconds": seconds})
        print(f"wrote {args.write / COMPETENCE_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

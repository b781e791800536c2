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
import sys
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


def _features(pipeline: Any, cases: Iterable[tuple[Any, Any]]) -> tuple[
        list[Any], npt.NDArray[np.float64], list[dict[str, Any]]]:
    """Pooled stage-2 features of (id, image) pairs; cases where stage 1 finds no gland
    are left out, and every case's check record is kept."""
    used: list[Any] = []
    feats: list[npt.NDArray[np.float64]] = []
    records: list[dict[str, Any]] = []
    for case_id, img in cases:
        f, record = pipeline.case_features(img)
        records.append({"seed": case_id, "failed": record.get("applicability_failed")})
        if f is not None:
            used.append(case_id)
            feats.append(np.asarray(f, np.float64))
    return used, (np.array(feats) if feats else np.zeros((0, 0))), records


def collect_features(pipeline: Any, seeds: Iterable[int], contrast: str) -> tuple[
        list[int], npt.NDArray[np.float64], list[dict[str, Any]]]:
    """Each phantom's pooled stage-2 features (seeds where stage 1 finds no gland are left out)."""
    from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk

    return _features(pipeline, (
        (seed, phantom_to_sitk(generate(PhantomSpec(seed=seed, contrast=contrast)))[0])  # type: ignore[arg-type]
        for seed in seeds))


def collect_folder_features(pipeline: Any, folder: Path, limit: int | None = None) -> tuple[
        list[str], npt.NDArray[np.float64], list[dict[str, Any]]]:
    """The same for the cases of an MSD folder (``imagesTr``, else ``imagesTs``): the
    randomised-appearance sets a model trained or is validated on."""
    from pipelines.training.data import find_cases, read_case

    return _features(pipeline, ((c.case_id, read_case(c)[0]) for c in find_cases(folder)[:limit]))


def _folder(text: str) -> tuple[Path, int | None]:
    """DIR or DIR:N (the first N cases)."""
    path, _, n = text.rpartition(":") if text.rpartition(":")[2].isdigit() else (text, "", "")
    return Path(path), (int(n) if n else None)


def _collect(pipe: Any, seeds: range | None, folders: list[tuple[Path, int | None]],
             contrast: str) -> tuple[list[Any], npt.NDArray[np.float64], list[dict[str, Any]],
                                     str]:
    ids: list[Any] = []
    parts: list[npt.NDArray[np.float64]] = []
    recs: list[dict[str, Any]] = []
    said: list[str] = []
    if seeds is not None:
        i, x, r = collect_features(pipe, seeds, contrast)
        ids, recs = ids + i, recs + r
        parts.append(x)
        said.append(f"{len(i)} training-generator phantoms, {_describe(seeds)} "
                    "(pipelines.phantom)")
    for folder, n in folders:
        names, x, r = collect_folder_features(pipe, folder, n)
        ids, recs = ids + names, recs + r
        parts.append(x)
        said.append(f"{len(names)} cases of {folder.name}")
    return ids, np.concatenate([p for p in parts if len(p)]), recs, "; ".join(said)


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
    ap.add_argument("--fit", type=_range, help="fitting seeds LO:HI (training)")
    ap.add_argument("--validate", type=_range,
                    help="validation seeds LO:HI (set the threshold)")
    ap.add_argument("--fit-data", type=_folder, nargs="*", default=[],
                    help="MSD folders (DIR or DIR:N) of training cases to fit on as well")
    ap.add_argument("--validate-data", type=_folder, nargs="*", default=[],
                    help="MSD folders of validation cases to set the threshold on as well")
    ap.add_argument("--models", type=Path, help="models folder (default: shipped)")
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
    if not (args.fit or args.fit_data) or not (args.validate or args.validate_data):
        ap.error("give fitting (--fit/--fit-data) and validation (--validate/--validate-data)")
    pipe = build_pipeline(args.pipeline, args.models, device=args.device,
                          settings=PipelineSettings(applicability=False))
    t0 = time.perf_counter()
    fit_seeds, fit_x, fit_rec, fit_txt = _collect(pipe, args.fit, args.fit_data, contrast)
    val_seeds, val_x, val_rec, val_txt = _collect(pipe, args.validate, args.validate_data,
                                                  contrast)
    fit = fit_statistics(fit_x, val_x, percentile=args.percentile)
    seconds = round(time.perf_counter() - t0, 1)
    summary = {
        "pipeline": args.pipeline, "stage2": pipe.stage2.manifest.name,
        "stage2_version": pipe.stage2.manifest.version,
        "fit": {"data": fit_txt, "cases": len(fit_seeds)},
        "validate": {"data": val_txt, "cases": len(val_seeds)},
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
            fitted_on=f"pooled stage-2 features of {contrast} training data: {fit_txt}, "
                      "through PancreasPipeline.case_features",
            threshold_on=f"{args.percentile:g}th percentile of the distances of "
                         f"{len(val_seeds)} validation cases: {val_txt}",
            details={"features": int(fit_x.shape[1]), "shrinkage": round(fit.shrinkage, 4),
                     "standardised": True, "estimator": "Ledoit-Wolf",
                     "fit_distance_median": summary["fit_distance_median"],
                     "validation_distance_median": summary["validation_distance_median"],
                     "command": "python -m pipelines.training.competence "
                                + " ".join(argv if argv is not None else sys.argv[1:]),
                     "seconds": seconds})
        print(f"wrote {args.write / COMPETENCE_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model packages: a folder with ``model.yaml`` (the manifest) and the weights.

Why a manifest: the node must know, before it runs a model on a patient's
scan, what the model expects (modality, spacing, patch size, intensity
preset), what it outputs, where it came from and what it may be used for.
The weights' sha256 is in the manifest and is checked before torch ever
reads the file, so a swapped or truncated weight file is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from pipelines.calibration import CalibrationEntry
from pipelines.models.networks import build
from storage.errors import ModelError

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "FoundPackage",
    "LoadedModel",
    "Manifest",
    "find_packages",
    "load_package",
    "load_qa_reference",
    "locate_package",
    "read_manifest",
    "sha256_file",
    "verify_package",
    "write_calibration",
    "write_package",
    "write_qa_reference",
]

MANIFEST = "model.yaml"
Task = Literal["pancreas-localisation", "lesion-detection", "slice-classification"]
WeightFormat = Literal["state_dict", "torchscript", "nnunetv2"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    name: str  # a name registered in pipelines.models.networks (or nnunetv2)
    params: dict[str, Any] = Field(default_factory=dict)


class InputContract(_Strict):
    modality: Literal["CT", "MR"]
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    patch_size: tuple[int, int, int]  # (z, y, x)
    intensity_preset: str  # ct_pancreas | mr_t1 | ct_range
    intensity_window: tuple[float, float] | None = None  # for ct_range: HU mapped to 0..1
    orientation: str = "LPS"
    # True: the input is put in ``orientation`` (axes permuted/flipped, no interpolation)
    # before it is resampled, as the model was trained. False (packages before 0.5.0):
    # the model was trained on the source's own axes and ``orientation`` is only a note.
    reorient: bool = False


class Weights(_Strict):
    file: str
    sha256: str
    format: WeightFormat = "state_dict"

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError("weights file must be a relative path inside the package")
        return v


class Training(_Strict):
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class Competence(_Strict):
    """Optional: the statistics of the model's features on its training data (an .npz).

    What the pipeline's competence check measures a case against: how far its
    features lie from those the model was trained on. Hashed like the weights,
    because a swapped file would silently change which cases are refused.
    """

    file: str
    sha256: str
    score: str = "mahalanobis"  # of the standardised features, Ledoit-Wolf shrinkage
    threshold: float  # a case scoring above it is outside the model's competence
    fitted_on: str  # which data the statistics come from
    threshold_on: str  # which data set the threshold, and how (e.g. its 99th percentile)
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        return Weights._hex(v)

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        return Weights._inside(v)


class QaReference(_Strict):
    """Optional: the quality records of the validation set (a JSON list), for drift monitoring.

    What the node's recent jobs are compared with (``ainode qa report``): the
    input descriptors, raw outputs and pooled features ``ainode evaluate`` saw
    on ``fitted_on``. Hashed like the weights, because a swapped file would
    silently decide which scanners raise an alert.
    """

    file: str
    sha256: str
    fitted_on: str  # which data set, in words (source, seeds)
    cases: int

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        return Weights._hex(v)

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        return Weights._inside(v)


class Manifest(_Strict):
    name: str
    version: str
    task: Task
    architecture: Architecture
    input: InputContract
    labels: list[str]
    outputs: str
    weights: Weights
    training: Training = Field(default_factory=Training)
    intended_use: str
    source: str = "ainode"  # ainode | monai-bundle | nnunetv2
    competence: Competence | None = None
    # The calibration ``ainode calibrate`` fitted (pipelines.calibration): what maps the
    # scores the pipeline reports to calibrated probabilities. None: reported raw.
    calibration: CalibrationEntry | None = None
    qa_reference: QaReference | None = None


@dataclass
class LoadedModel:
    manifest: Manifest
    module: nn.Module
    path: Path
    device: torch.device
    # The verified competence statistics (arrays by name), None when the package has none.
    competence: dict[str, npt.NDArray[Any]] | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a folder (nnU-Net results): relative names and contents, sorted."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def read_manifest(pkg: Path) -> Manifest:
    f = pkg / MANIFEST
    if not f.is_file():
        raise ModelError(f"{pkg}: no {MANIFEST}; not a model package")
    try:
        data = yaml.safe_load(f.read_text())
        return Manifest.model_validate(data)
    except yaml.YAMLError as exc:
        raise ModelError(f"{f}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ModelError(f"{f}: invalid manifest at {where}: {first['msg']}") from exc


def verify_package(pkg: Path) -> Manifest:
    """The manifest, after checking that the weights are exactly those it names."""
    m = read_manifest(pkg)
    wf = pkg / m.weights.file
    if not wf.exists():
        raise ModelError(f"{pkg.name}: weights file {m.weights.file} is missing")
    actual = sha256_tree(wf) if wf.is_dir() else sha256_file(wf)
    if actual != m.weights.sha256:
        raise ModelError(
            f"{pkg.name}: weights hash mismatch (manifest {m.weights.sha256[:12]}…, "
            f"file {actual[:12]}…); refusing to load"
        )
    return m


def load_competence(pkg: Path, m: Manifest) -> dict[str, npt.NDArray[Any]] | None:
    """The package's competence arrays after checking their sha256; None if it declares none.

    A declared file that is missing, altered or unreadable is refused like
    altered weights: the check it feeds decides which cases are reported.
    """
    if m.competence is None:
        return None
    f = pkg / m.competence.file
    if not f.is_file():
        raise ModelError(f"{pkg.name}: competence file {m.competence.file} is missing")
    actual = sha256_file(f)
    if actual != m.competence.sha256:
        raise ModelError(
            f"{pkg.name}: competence file hash mismatch (manifest "
            f"{m.competence.sha256[:12]}…, file {actual[:12]}…); refusing to load"
        )
    try:
        with np.load(f, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{pkg.name}: cannot read competence file: {exc}") from exc
    missing = {"mean", "scale", "precision"} - set(arrays)
    if missing:
        raise ModelError(f"{pkg.name}: competence file lacks {', '.join(sorted(missing))}")
    return arrays


QA_REFERENCE_FILE = "qa_reference.json"


def write_qa_reference(pkg: Path, records: list[dict[str, Any]], *, fitted_on: str) -> Manifest:
    """Store the validation set's quality records in the package; the verified manifest.

    The version is unchanged: the reference changes no output of the model, only
    what the node compares its inputs with, so jobs need not be redone.
    """
    m = verify_package(pkg)
    f = pkg / QA_REFERENCE_FILE
    f.write_text(json.dumps(records, separators=(",", ":")))
    entry = QaReference(file=QA_REFERENCE_FILE, sha256=sha256_file(f), fitted_on=fitted_on,
                        cases=len(records))
    write_manifest(pkg, m.model_copy(update={"qa_reference": entry}))
    return verify_package(pkg)


def load_qa_reference(pkg: Path, m: Manifest) -> list[dict[str, Any]] | None:
    """The package's reference records after checking their sha256; None if it has none."""
    if m.qa_reference is None:
        return None
    f = pkg / m.qa_reference.file
    if not f.is_file():
        raise ModelError(f"{pkg.name}: quality reference {m.qa_reference.file} is missing")
    actual = sha256_file(f)
    if actual != m.qa_reference.sha256:
        raise ModelError(f"{pkg.name}: quality reference hash mismatch (manifest "
                         f"{m.qa_reference.sha256[:12]}…, file {actual[:12]}…)")
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{pkg.name}: cannot read quality reference: {exc}") from exc
    if not isinstance(data, list):
        raise ModelError(f"{pkg.name}: quality reference is not a list of records")
    return data


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present (the pipeline then runs under autocast), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but CUDA is not available")
    return dev


def load_package(pkg: Path, device: str = "auto") -> LoadedModel:
    """Verify, build and load a package; the module is in eval mode on ``device``."""
    m = verify_package(pkg)
    competence = load_competence(pkg, m)
    dev = resolve_device(device)
    wf = pkg / m.weights.file
    try:
        if m.weights.format == "torchscript":
            module: nn.Module = torch.jit.load(str(wf), map_location=dev)
        elif m.weights.format == "nnunetv2":
            from pipelines.models.nnunet import load_nnunet

            module = load_nnunet(wf, m, dev)
        else:
            if m.source == "monai-bundle":
                from pipelines.models.bundle import build_bundle_network

                module = build_bundle_network(m.architecture.name, m.architecture.params)
            else:
                module = build(m.architecture.name, m.architecture.params)
            state = torch.load(wf, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and len(state) <= 4:
                state = state["state_dict"]
            module.load_state_dict(state)
    except ModelError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{pkg.name}: cannot load weights: {exc}") from exc
    module.to(dev).eval()
    log.info("loaded model %s %s on %s", m.name, m.version, dev)
    return LoadedModel(m, module, pkg, dev, competence)


INTENDED_USE_DEMO = (
    "DEMO WEIGHTS trained by this project's own code on images it synthesised "
    "(pipelines.phantom; training.provenance names every source, which may include lesions "
    "painted into a public real CT). RESEARCH USE ONLY, NOT FOR CLINICAL USE: not validated "
    "on patient data."
)


def write_package(
    out: Path,
    recipe: Any,
    state_dict: dict[str, torch.Tensor],
    provenance: dict[str, Any],
    *,
    version: str = "0.1.0-demo",
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.yaml`` + ``weights.pt`` (fp32 state dict) + a model card."""
    out.mkdir(parents=True, exist_ok=True)
    wf = out / "weights.pt"
    tmp = out / "weights.pt.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    tmp.replace(wf)
    manifest = Manifest(
        name=recipe.package,
        version=version,
        task=recipe.task,
        architecture=Architecture(name=recipe.arch, params=dict(recipe.params)),
        input=InputContract(
            modality=recipe.modality, spacing_mm=recipe.spacing,
            patch_size=recipe.patch_zyx, intensity_preset=recipe.preset,
            reorient=bool(getattr(recipe, "reorient", False)),
        ),
        labels=list(recipe.labels),
        outputs=recipe.outputs,
        weights=Weights(file="weights.pt", sha256=sha256_file(wf)),
        training=Training(provenance=provenance, metrics=metrics or {}),
        intended_use=INTENDED_USE_DEMO,
    )
    write_manifest(out, manifest)
    (out / "MODEL_CARD.md").write_text(_card(manifest))
    return out


def write_manifest(out: Path, manifest: Manifest) -> None:
    data = manifest.model_dump(mode="json")
    for key in ("competence", "calibration", "qa_reference"):  # absent, not "null", if none
        if data.get(key) is None:
            data.pop(key, None)
    (out / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))


CAL_VERSION = "+cal."  # the version suffix a calibrated package gets


def write_calibration(pkg: Path, entry: CalibrationEntry | None) -> Manifest:
    """Store ``entry`` in the package's manifest (None removes it); the verified manifest.

    The version gets a ``+cal.<hash>`` suffix (semver build metadata) naming
    the calibration, replacing an earlier one: the version is what job
    de-duplication and every result's provenance compare, and a recalibrated
    package reports other probabilities on the same series.
    """
    m = verify_package(pkg)
    base = m.version.split(CAL_VERSION, 1)[0]
    version = base
    if entry is not None:
        digest = hashlib.sha256(entry.model_dump_json().encode()).hexdigest()[:8]
        version = f"{base}{CAL_VERSION}{digest}"
    new = m.model_copy(update={"calibration": entry, "version": version})
    write_manifest(pkg, Manifest.model_validate(new.model_dump()))
    return verify_package(pkg)


def _card(m: Manifest) -> str:
    return (
        f"# {m.name} {m.version}\n\n"
        f"**Research use only, not for clinical use: trained on synthesised images.**\n\n"
        f"- Task: {m.task}\n- Architecture: {m.architecture.name} {m.architecture.params}\n"
        f"- Input: {m.input.modality}, spacing {m.input.spacing_mm} mm, patch "
        f"{m.input.patch_size} (z, y, x), intensity preset {m.input.intensity_preset}"
        f"{', reoriented to ' + m.input.orientation if m.input.reorient else ''}\n"
        f"- Labels: {', '.join(m.labels)}\n- Outputs: {m.outputs}\n"
        f"- Training: {m.training.provenance}\n\n{m.intended_use}\n\n"
        "Reproduce with `make train-demo`; evaluate with `ainode evaluate`.\n"
    )


def find_packages(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


PackageSource = Literal["models_dir", "shipped"]


@dataclass(frozen=True)
class FoundPackage:
    """A package a pipeline stage will load, and which folder it came from."""

    name: str
    path: Path
    source: PackageSource


def locate_package(name: str, models_dir: Path | None, shipped: Path) -> FoundPackage | None:
    """``models_dir/<name>``, else the shipped ``shipped/<name>``; None when neither has it.

    The folder name is the manifest name because that is where
    :func:`import_package` (``ainode models import --to DIR``) and the bundle
    and nnU-Net importers put a package; the configured folder wins package by
    package, so a site can replace one stage and keep the shipped others.
    """
    if models_dir is not None and (models_dir / name / MANIFEST).is_file():
        return FoundPackage(name, models_dir / name, "models_dir")
    if (shipped / name / MANIFEST).is_file():
        return FoundPackage(name, shipped / name, "shipped")
    return None


def clear_destination(dest: Path, *, force: bool) -> None:
    """Make room for a package at ``dest``: an existing one is replaced only with ``force``.

    Every importer (package, MONAI bundle, nnU-Net folder) goes through here so
    that none of them overwrites an installed model silently.
    """
    if dest.exists():
        if not force:
            raise ModelError(f"{dest} exists; use --force to replace it")
        shutil.rmtree(dest)


def import_package(src: Path, models_dir: Path, *, force: bool = False) -> Path:
    """Copy a verified package into ``models_dir`` under its manifest name."""
    m = verify_package(src)
    dest = models_dir / m.name
    clear_destination(dest, force=force)
    shutil.copytree(src, dest)
    verify_package(dest)
    return dest

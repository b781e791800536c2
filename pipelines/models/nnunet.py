"""nnU-Net v2 trained-model folders as stage-1 or stage-2 models (extra ``nnunet``).

The published PANORAMA baseline ships nnU-Net v2 results folders
(``dataset.json``, ``plans.json``, ``fold_N/checkpoint_final.pth``). Import
validates the layout and hashes the whole folder into the manifest; loading
goes through ``nnunetv2``'s own predictor, because nnU-Net's preprocessing
(its resampling and normalisation from the plans) is part of the model.
``nnunetv2`` is an optional extra, not installed by default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
import torch
from torch import nn

from pipelines.models.package import (
    Architecture,
    InputContract,
    Manifest,
    Training,
    Weights,
    clear_destination,
    sha256_tree,
    write_manifest,
)
from storage.errors import ModelError

__all__ = ["NnUNetModel", "import_nnunet_folder", "load_nnunet", "read_nnunet_folder"]


def read_nnunet_folder(src: Path, configuration: str = "3d_fullres") -> dict[str, Any]:
    """Layout check and the facts the manifest needs; raises ModelError on anything amiss."""
    for f in ("dataset.json", "plans.json"):
        if not (src / f).is_file():
            raise ModelError(f"{src}: no {f}; not an nnU-Net v2 results folder")
    folds = sorted(p for p in src.glob("fold_*") if (p / "checkpoint_final.pth").is_file())
    if not folds:
        raise ModelError(f"{src}: no fold_N/checkpoint_final.pth")
    try:
        dataset = json.loads((src / "dataset.json").read_text())
        plans = json.loads((src / "plans.json").read_text())
        conf = plans["configurations"][configuration]
        spacing_zyx = [float(v) for v in conf["spacing"]]
        patch_zyx = [int(v) for v in conf["patch_size"]]
        labels = sorted(dataset["labels"], key=lambda k: int(dataset["labels"][k]))
        channels = dataset["channel_names"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{src}: unreadable nnU-Net plans/dataset: {exc}") from exc
    if len(spacing_zyx) != 3 or len(patch_zyx) != 3:
        raise ModelError(f"{src}: configuration {configuration} is not 3D")
    modality = "MR" if any("MR" in str(v).upper() or "T1" in str(v).upper()
                           for v in channels.values()) else "CT"
    return {"spacing_zyx": spacing_zyx, "patch_zyx": patch_zyx, "labels": labels,
            "folds": [int(p.name.split("_")[1]) for p in folds], "modality": modality,
            "configuration": configuration}


def import_nnunet_folder(src: Path, dest_root: Path, *, name: str | None = None,
                         task: str = "pancreas-localisation", force: bool = False,
                         configuration: str = "3d_fullres") -> Path:
    info = read_nnunet_folder(src, configuration)
    pkg_name = name or src.name
    out = dest_root / pkg_name
    clear_destination(out, force=force)
    out.mkdir(parents=True)
    shutil.copytree(src, out / "nnunet")
    manifest = Manifest(
        name=pkg_name, version="nnunetv2", task=task,  # type: ignore[arg-type]
        architecture=Architecture(name="nnunetv2", params={
            "configuration": configuration, "folds": info["folds"]}),
        input=InputContract(
            modality=info["modality"],
            spacing_mm=tuple(info["spacing_zyx"][::-1]),  # type: ignore[arg-type]
            patch_size=tuple(info["patch_zyx"]),  # type: ignore[arg-type]
            intensity_preset="nnunet",
        ),
        labels=info["labels"],
        outputs="nnU-Net softmax over labels on the source grid",
        weights=Weights(file="nnunet", sha256=sha256_tree(out / "nnunet"), format="nnunetv2"),
        training=Training(provenance={"nnunet_folder": str(src)}),
        intended_use="as stated by the model's authors",
        source="nnunetv2",
    )
    write_manifest(out, manifest)
    return out


class NnUNetModel(nn.Module):
    """nnU-Net's predictor behind the node's interface: whole image in, probabilities
    (labels, z, y, x) on the source grid out."""

    def __init__(self, predictor: Any) -> None:
        super().__init__()
        self.predictor = predictor

    def predict_image(self, img: sitk.Image) -> npt.NDArray[np.float32]:
        arr = sitk.GetArrayFromImage(img)[None].astype(np.float32)
        props = {"spacing": list(img.GetSpacing())[::-1]}
        _, probs = self.predictor.predict_single_npy_array(arr, props, None, None, True)
        return np.asarray(probs, dtype=np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not patch-based
        raise ModelError("nnU-Net models run on whole images (predict_image), not patches")


def load_nnunet(folder: Path, manifest: Manifest, device: torch.device) -> nn.Module:
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as exc:
        raise ModelError(
            "nnU-Net v2 models need the optional extra: pip install 'dicom-ai-node[nnunet]'"
        ) from exc
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=device, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(folder), use_folds=tuple(manifest.architecture.params.get("folds", [0])),
        checkpoint_name="checkpoint_final.pth",
    )
    return NnUNetModel(predictor)

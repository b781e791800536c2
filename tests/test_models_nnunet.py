"""nnU-Net v2 folders: what the import checks, with a tiny folder built here.

Honest scope: without the optional ``nnunet`` extra this checks the layout
validation, the manifest (spacing, patch, labels, folds), the folder hash and
the clear refusal to load; running the predictor needs nnunetv2 and a real
checkpoint, which the tiny folder is not.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipelines.models.nnunet import import_nnunet_folder
from pipelines.models.package import load_package, verify_package
from storage.errors import ModelError


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1, "tumour": 2},
        "numTraining": 1, "file_ending": ".nii.gz",
    }))
    (root / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {
        "spacing": [3.0, 0.8, 0.8], "patch_size": [64, 160, 160]}}}))
    (root / "fold_0").mkdir()
    torch.save({"network_weights": {}}, root / "fold_0" / "checkpoint_final.pth")
    return root


def test_import_records_plans_and_hash(tmp_path: Path) -> None:
    out = import_nnunet_folder(_folder(tmp_path / "Dataset103_PANORAMA"), tmp_path / "models",
                               task="lesion-detection")
    m = verify_package(out)
    assert m.weights.format == "nnunetv2"
    assert m.input.spacing_mm == (0.8, 0.8, 3.0)  # nnU-Net (z, y, x) -> (x, y, z)
    assert m.input.patch_size == (64, 160, 160)
    assert m.labels == ["background", "pancreas", "tumour"]
    assert m.architecture.params["folds"] == [0]
    (out / "nnunet" / "fold_0" / "checkpoint_final.pth").write_bytes(b"swapped")
    with pytest.raises(ModelError, match="hash mismatch"):
        verify_package(out)


@pytest.mark.parametrize("missing", ["dataset.json", "plans.json", "fold_0"])
def test_incomplete_folder_is_refused(tmp_path: Path, missing: str) -> None:
    src = _folder(tmp_path / "f")
    target = src / missing
    if target.is_dir():
        (target / "checkpoint_final.pth").unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ModelError):
        import_nnunet_folder(src, tmp_path / "models")


def test_loading_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    if importlib.util.find_spec("nnunetv2") is not None:
        pytest.skip("nnunetv2 is installed; the tiny folder has no real checkpoint to load")
    out = import_nnunet_folder(_folder(tmp_path / "f"), tmp_path / "models")
    with pytest.raises(ModelError, match=r"dicom-ai-node\[nnunet\]"):
        load_package(out, "cpu")

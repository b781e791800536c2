"""MONAI bundle import: a bundle built here, imported as a package, run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from pipelines.models.bundle import import_monai_bundle
from pipelines.models.package import load_package, verify_package
from storage.errors import ModelError

NET_DEF = {
    "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
}


def _bundle(root: Path, net_def: dict | None = None) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    params = {k: v for k, v in NET_DEF.items() if k != "_target_"}
    net = UNet(**params)
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    cfg = {
        # The bundle hard-codes a CUDA device the way Model Zoo bundles do.
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": net_def or {**NET_DEF, "channels": "@channels"},
        "channels": [4, 8, 16],
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -87, "a_max": 199,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16],
                    "sw_batch_size": 1},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    (root / "configs" / "metadata.json").write_text(json.dumps({
        "name": "tiny pancreas bundle", "version": "0.3.1",
        "network_data_format": {"outputs": {"pred": {"channel_def": {
            "0": "background", "1": "pancreas"}}}},
    }))
    return root, net


def test_bundle_imports_as_a_cpu_package(tmp_path: Path) -> None:
    src, net = _bundle(tmp_path / "bundle")
    out = import_monai_bundle(src, tmp_path / "models", name="tiny-bundle")
    m = verify_package(out)
    assert m.source == "monai-bundle"
    assert m.task == "pancreas-localisation"
    assert m.version == "0.3.1"
    assert m.input.spacing_mm == (1.5, 1.5, 2.0)
    assert m.input.patch_size == (16, 32, 32)  # MONAI (x, y, z) -> node (z, y, x)
    assert m.input.intensity_window == (-87.0, 199.0)
    assert m.labels == ["background", "pancreas"]
    loaded = load_package(out, "cpu")  # the bundle's cuda device is never used
    assert loaded.device.type == "cpu"
    # Same numbers as the original network on the same voxels, axes mapped LPS(z,y,x)->RAS.
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        ours = loaded.module(x)
        ras = torch.flip(x.permute(0, 1, 4, 3, 2), dims=(2, 3))
        ref = torch.flip(net.eval()(ras), dims=(2, 3)).permute(0, 1, 4, 3, 2)
    assert ours.shape == (1, 2, 16, 24, 32)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_bundle_works_as_stage1_of_the_pipeline(tmp_path: Path) -> None:
    from pipelines.pancreas.model import PancreasPipeline
    from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk

    src, _ = _bundle(tmp_path / "bundle")
    stage1 = import_monai_bundle(src, tmp_path / "models", name="tiny-bundle")
    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "weights"
    assert (shipped / "pancreas-ct-stage2" / "model.yaml").exists(), "demo weights missing"
    pipe = PancreasPipeline.from_packages("pancreas-ct", stage1, shipped / "pancreas-ct-stage2",
                                          device="cpu")
    img, _ = phantom_to_sitk(generate(PhantomSpec(seed=11, diagnosis="normal")))
    res = pipe.report(img)  # an untrained bundle: whatever it finds, the result is well formed
    assert res.pipeline == "pancreas-ct"
    assert "tiny-bundle" in pipe.model_identity()
    assert len(res.algorithm.version) <= 64
    if res.pancreas_found:
        assert res.pancreas_mask is not None
        assert res.pancreas_mask.shape == tuple(reversed(img.GetSize()))
    assert 0.0 <= res.patient_score <= 1.0
    assert np.isfinite(res.patient_score)


@pytest.mark.parametrize(("net_def", "message"), [
    ({**NET_DEF, "_target_": "$__import__('os').system('true')"}, "expression"),
    ({**NET_DEF, "_target_": "torch.nn.Identity"}, "not an allowed"),
    ({**NET_DEF, "channels": "$[4, 8, 16]"}, "expression"),
    ({**NET_DEF, "out_channels": 3}, "do not fit"),
])
def test_bundles_that_would_run_code_or_do_not_fit_are_refused(
        tmp_path: Path, net_def: dict, message: str) -> None:
    src, _ = _bundle(tmp_path / "bundle", net_def)
    with pytest.raises(ModelError, match=message):
        import_monai_bundle(src, tmp_path / "models")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        import_monai_bundle(tmp_path, tmp_path / "models")

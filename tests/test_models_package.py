"""Model packages: manifest validation, hash refusal, loading, the networks, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from node.cli import app
from pipelines.models.networks import MultiTaskNet3D, SliceClassifier2D, build
from pipelines.models.package import (
    load_package,
    read_manifest,
    sha256_file,
    verify_package,
    write_manifest,
    write_package,
)
from pipelines.training.recipes import RECIPES
from storage.errors import ModelError


@pytest.fixture
def package(tmp_path: Path) -> Path:
    recipe = RECIPES["ct-stage1"]
    torch.manual_seed(0)
    net = build(recipe.arch, recipe.params)
    return write_package(tmp_path / "pkg", recipe, net.state_dict(), {"test": True})


def test_written_package_verifies_and_loads(package: Path) -> None:
    m = verify_package(package)
    assert m.name == "pancreas-ct-stage1"
    assert m.weights.sha256 == sha256_file(package / "weights.pt")
    assert "NOT FOR CLINICAL USE" in m.intended_use
    loaded = load_package(package, "cpu")
    x = torch.zeros(1, 1, 16, 16, 16)
    assert loaded.module(x).shape == (1, 2, 16, 16, 16)
    assert "synthetic phantoms" in (package / "MODEL_CARD.md").read_text()


def test_tampered_weights_are_refused(package: Path) -> None:
    state = torch.load(package / "weights.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 1.0
    torch.save(state, package / "weights.pt")
    with pytest.raises(ModelError, match="hash mismatch"):
        verify_package(package)
    with pytest.raises(ModelError, match="refusing"):
        load_package(package, "cpu")


def test_missing_weights_are_refused(package: Path) -> None:
    (package / "weights.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        verify_package(package)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(unexpected="x"), "unexpected"),
    (lambda d: d["input"].update(modality="PET"), "input.modality"),
    (lambda d: d["weights"].update(sha256="abc"), "weights.sha256"),
    (lambda d: d["weights"].update(file="../outside.pt"), "weights.file"),
    (lambda d: d.pop("intended_use"), "intended_use"),
    (lambda d: d.update(task="segment-anything"), "task"),
])
def test_manifest_validation_names_the_bad_key(package: Path, edit, message: str) -> None:
    data = yaml.safe_load((package / "model.yaml").read_text())
    edit(data)
    (package / "model.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match=message):
        read_manifest(package)


def test_unknown_architecture_is_refused(package: Path) -> None:
    m = read_manifest(package)
    bad = m.model_copy(update={"architecture": m.architecture.model_copy(
        update={"name": "os.system"})})
    write_manifest(package, bad)
    with pytest.raises(ModelError, match="unknown architecture"):
        load_package(package, "cpu")


def test_torchscript_weights_load(tmp_path: Path, package: Path) -> None:
    loaded = load_package(package, "cpu")
    scripted = torch.jit.trace(loaded.module, torch.zeros(1, 1, 16, 16, 16))
    ts_pkg = tmp_path / "ts"
    shutil.copytree(package, ts_pkg)
    scripted.save(str(ts_pkg / "model.ts"))
    m = read_manifest(ts_pkg)
    write_manifest(ts_pkg, m.model_copy(update={"weights": m.weights.model_copy(update={
        "file": "model.ts", "format": "torchscript", "sha256": sha256_file(ts_pkg / "model.ts")})}))
    ts = load_package(ts_pkg, "cpu")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ts.module(x), loaded.module(x), atol=1e-5)


def test_cuda_request_without_cuda_is_a_model_error(package: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present on this machine")
    with pytest.raises(ModelError, match="CUDA"):
        load_package(package, "cuda")


def test_slice_classifier_is_the_published_shape() -> None:
    net = SliceClassifier2D()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256]
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout)]
    assert drops == [0.25] * 4 + [0.5, 0.5]
    dense = [m.out_features for m in net.head if isinstance(m, torch.nn.Linear)]
    assert dense == [512, 256, 5]
    net.eval()
    assert net(torch.zeros(2, 3, 150, 150)).shape == (2, 5)
    flat = SliceClassifier2D(pool="flatten")
    assert flat.head[0].in_features == 256 * 9 * 9


def test_multitask_net_outputs_map_and_class_logits() -> None:
    net = MultiTaskNet3D(channels=(4, 8, 16, 32), fpn_channels=8)
    seg, cls = net(torch.zeros(2, 1, 16, 24, 32))
    assert seg.shape == (2, 1, 16, 24, 32)
    assert cls.shape == (2, 5)
    with pytest.raises(ValueError):
        MultiTaskNet3D(channels=(4, 8))


def test_cli_models_list_show_verify_and_refusal(tmp_path: Path, package: Path) -> None:
    runner = CliRunner()
    models = tmp_path / "models"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")},
                                   "inference": {"models_dir": str(models)}}))
    r = runner.invoke(app, ["-c", str(cfg), "models", "import", str(package)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["-c", str(cfg), "models", "list", "--json"])
    assert r.exit_code == 0
    assert str(models / "pancreas-ct-stage1") in r.output
    r = runner.invoke(app, ["-c", str(cfg), "models", "show", "pancreas-ct-stage1"])
    assert r.exit_code == 0 and "stage1_unet" in r.output
    r = runner.invoke(app, ["-c", str(cfg), "models", "verify", "pancreas-ct-stage1"])
    assert r.exit_code == 0 and "ok" in r.output
    (models / "pancreas-ct-stage1" / "weights.pt").write_bytes(b"not the weights")
    r = runner.invoke(app, ["-c", str(cfg), "models", "verify", "pancreas-ct-stage1"])
    assert r.exit_code == 2
    assert "REFUSED" in r.output
    r = runner.invoke(app, ["-c", str(cfg), "models", "import",
                            str(models / "pancreas-ct-stage1"), "--to", str(tmp_path / "o")])
    assert r.exit_code == 2

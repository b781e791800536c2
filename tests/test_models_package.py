"""Model packages: manifest validation, hash refusal, loading, the networks, the CLI, and
the packages of ``inference.models_dir`` being what a job runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.config import NodeConfig
from node.worker import Worker
from pipelines import registry
from pipelines.models.networks import MultiTaskNet3D, SliceClassifier2D, build
from pipelines.models.package import (
    load_package,
    read_manifest,
    sha256_file,
    verify_package,
    write_manifest,
    write_package,
)
from pipelines.pancreas import model_packages
from pipelines.pancreas.model import SHIPPED_WEIGHTS
from pipelines.phantom import PhantomSpec, generate, write_dicom_series
from pipelines.training.recipes import RECIPES
from storage import jobs as job_store
from storage.db import Database
from storage.errors import ModelError
from storage.filestore import FileStore
from storage.models import Instance, Job, JobState, Output, RoutingRule, Series, Study, utcnow


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
    card = (package / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card and "training.provenance names every source" in card


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


# --- inference.models_dir: what a job runs ---------------------------------------------------

def _site_copy(shipped: str, out: Path, version: str) -> Path:
    """A shipped package re-versioned with the package tooling, as a site's own model would be."""
    shutil.copytree(SHIPPED_WEIGHTS / shipped, out)
    write_manifest(out, read_manifest(out).model_copy(update={"version": version}))
    return out


def _spool(db: Database, store: FileStore, files: list[Path]) -> int:
    """The rows and spool files the receiver would leave for a completed CT series."""
    datasets = [pydicom.dcmread(f) for f in files]
    head = datasets[0]
    with db.session() as s:
        series = Series(series_instance_uid=str(head.SeriesInstanceUID), modality="CT",
                        study=Study(study_instance_uid=str(head.StudyInstanceUID)),
                        state="routed", instance_count=len(files), first_received_at=utcnow(),
                        last_received_at=utcnow())
        for f, ds in zip(files, datasets, strict=True):
            uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            stored = store.write_instance(*uids, [f.read_bytes()])
            s.add(Instance(sop_instance_uid=uids[2], series=series, path=stored.relpath,
                           sop_class_uid=str(ds.SOPClassUID), size_bytes=stored.size,
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                           sha256=stored.sha256))
        s.flush()
        return series.id


def _text_values(ds: pydicom.Dataset, concept: str) -> list[str]:
    """Every TextValue under the SR content items named by code ``concept``."""
    out = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == concept and "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(_text_values(item, concept))
    return out


def test_a_package_imported_into_models_dir_is_what_a_job_runs(
        tmp_path: Path, sqlite_db: Database, filestore: FileStore) -> None:
    models = tmp_path / "models"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(filestore.data_dir)},
                                   "inference": {"models_dir": str(models), "device": "cpu"}}))
    site = _site_copy("pancreas-ct-stage2", tmp_path / "site" / "pancreas-ct-stage2",
                      "0.9.0-site")
    runner = CliRunner()
    r = runner.invoke(app, ["-c", str(cfg), "models", "import", str(site), "--to", str(models)])
    assert r.exit_code == 0, r.output

    # `ainode models list` says, stage by stage, which package a job loads and from where.
    r = runner.invoke(app, ["-c", str(cfg), "models", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {(row["name"], row["source"]): row for row in json.loads(r.stdout)}
    assert rows["pancreas-ct-stage2", "models_dir"]["version"] == "0.9.0-site"
    assert rows["pancreas-ct-stage2", "models_dir"]["used_by"] == "pancreas-ct:stage2"
    assert rows["pancreas-ct-stage2", "shipped"]["used_by"] == "- (replaced by models_dir)"
    assert rows["pancreas-ct-stage1", "shipped"]["used_by"] == "pancreas-ct:stage1"
    assert rows["pancreas-ct-slice", "shipped"]["used_by"] == "pancreas-ct:slice"
    assert rows["pancreas-mr-stage2", "shipped"]["used_by"] == "pancreas-mr:stage2"

    phantom = generate(PhantomSpec(seed=606060, diagnosis="PDAC", lesion_diameter_mm=25.0))
    series_id = _spool(sqlite_db, filestore,
                       write_dicom_series(phantom, tmp_path / "dcm", seed=606060))
    config = NodeConfig(storage={"data_dir": filestore.data_dir},
                        inference={"models_dir": models, "device": "cpu"})
    expected = registry.get("pancreas-ct", models_dir=models, device="cpu").model_version()
    assert "0.9.0-site" in expected
    with sqlite_db.session() as s:
        rule = RoutingRule(name="site-model", version=1, pipeline="pancreas-ct",
                           conditions=[], destinations=[], shadow=True)
        s.add(rule)
        s.flush()
        job, _ = job_store.ensure_job(s, s.get_one(Series, series_id), job_store.JobRequest(
            pipeline="pancreas-ct", model_version=expected, rule=rule, shadow=True))
        job_id = job.id

    assert Worker(sqlite_db, filestore, config, lease_s=120.0).run_once() == job_id
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        assert job.provenance["pipeline_model_version"] == expected
        assert "model_version_changed_from" not in job.provenance
        ran = job.provenance["result"]
        assert "pancreas-ct-stage2@0.9.0-site" in ran["models"]
        assert (ran["stage1_source"], ran["stage2_source"], ran["slice_source"]) == (
            "shipped", "models_dir", "shipped")
        assert ran["models_dir"] == str(models.resolve())
        sr_out = s.scalars(select(Output).where(Output.job_id == job_id,
                                                Output.kind == "SR")).one()
        sr = pydicom.dcmread(filestore.result_path(sr_out.path))
    assert sr.SoftwareVersions[0] == expected
    versions = _text_values(sr, "111003")  # (111003, DCM, "Algorithm Version")
    assert versions and set(versions) == {expected}


def test_stages_fall_back_to_the_shipped_packages_one_by_one(tmp_path: Path) -> None:
    models = tmp_path / "models"
    found = model_packages("pancreas-ct", models)  # the folder does not even exist
    assert {s: f.source for s, f in found.items() if f} == {
        "stage1": "shipped", "stage2": "shipped", "slice": "shipped"}
    _site_copy("pancreas-ct-slice", models / "pancreas-ct-slice", "2.0.0-site")
    found = model_packages("pancreas-ct", models)
    assert found["slice"] is not None and found["slice"].source == "models_dir"
    assert found["slice"].path == models / "pancreas-ct-slice"
    assert model_packages("pancreas-mr", models)["slice"] is None  # none anywhere: optional
    assert registry.model_packages("pancreas-ct", models) == found
    assert registry.model_packages("pancreas-ct") == model_packages("pancreas-ct", None)


def test_a_refused_package_in_models_dir_is_never_replaced_by_the_shipped_one(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    _site_copy("pancreas-ct-stage1", models / "pancreas-ct-stage1", "0.9.0-site")
    (models / "pancreas-ct-stage1" / "weights.pt").write_bytes(b"not the weights")
    with pytest.raises(ModelError, match="pancreas-ct-stage1: weights hash mismatch"):
        registry.get("pancreas-ct", models_dir=models, device="cpu")


def test_a_pipeline_without_its_required_packages_names_them(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    import pipelines.pancreas as pancreas

    monkeypatch.setattr(pancreas, "SHIPPED_WEIGHTS", tmp_path / "no-weights")
    with pytest.raises(ModelError, match="no package pancreas-mr-stage1, pancreas-mr-stage2"):
        pancreas.build_pipeline("pancreas-mr", tmp_path / "models", device="cpu")

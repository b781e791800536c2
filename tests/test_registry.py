"""The pipeline registry: entry-point discovery, the factory contract, and plug-in errors.

A plug-in here is published the way ``pip install`` publishes one (a
``*.dist-info`` with an ``entry_points.txt`` on ``sys.path``, written by
tests.plugins.publish), so the registry finds it through importlib.metadata
and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import registry
from storage.errors import ModelError
from tests.plugins import publish
from tests.plugins.tiny_pipeline import TinyPipeline

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "tests.plugins.tiny_pipeline"
TINY = {
    "tiny": f"{PLUGIN}:factory",
    "tiny-broken-import": f"{PLUGIN}.broken:factory",
    "tiny-missing-attr": f"{PLUGIN}:does_not_exist",
    "tiny-no-args": f"{PLUGIN}:no_args_factory",
    "tiny-not-callable": f"{PLUGIN}:not_a_factory",
    "tiny-failing": f"{PLUGIN}:failing_factory",
}


@pytest.fixture
def on_path(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path for dist-infos; the registry forgets them afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        registry.refresh()


@pytest.fixture
def tiny(on_path: Path) -> Path:
    publish(on_path, "ainode-tiny-plugin", {registry.GROUP: TINY})
    registry.refresh()
    return on_path


def test_builtins_are_listed_from_metadata_without_importing_them() -> None:
    code = ("import sys; from pipelines import registry; print(registry.available()); "
            "print('pipelines.pancreas' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    assert "'pancreas-ct'" in out[0] and "'pancreas-mr'" in out[0]
    assert out[1] == "False False"


def test_a_published_plugin_is_discovered_and_built_with_the_configuration(
        tiny: Path, tmp_path: Path) -> None:
    assert {"tiny", "pancreas-ct", "pancreas-mr"} <= set(registry.available())
    models = tmp_path / "models"
    p = registry.get("tiny", models_dir=models, device="cpu")
    assert isinstance(p, TinyPipeline)
    assert p.models_dir == models.resolve() and p.device == "cpu"
    assert registry.get("tiny", models_dir=models, device="cpu") is p  # built once
    other = registry.get("tiny", device="cpu")
    assert other is not p and other.models_dir is None
    assert registry.get("tiny", models_dir=models, device="cpu") is p


def test_a_plugin_installed_later_is_found_after_refresh(on_path: Path) -> None:
    assert "tiny" not in registry.available()
    publish(on_path, "ainode-tiny-plugin", {registry.GROUP: {"tiny": f"{PLUGIN}:factory"}})
    assert "tiny" not in registry.available()  # discovered once, on first use
    registry.refresh()
    assert "tiny" in registry.available()


@pytest.mark.parametrize(("name", "message"), [
    ("tiny-broken-import", "cannot be loaded: ImportError: No module named "
                           "'tiny_pipeline_dependency'"),
    ("tiny-missing-attr", "cannot be loaded: AttributeError"),
    ("tiny-no-args", "must accept the keyword arguments models_dir and device, "
                     "but its signature is ()"),
    ("tiny-not-callable", "is a str, not a callable factory"),
    ("tiny-failing", "could not be built: RuntimeError: the tiny weights are not there"),
])
def test_a_broken_plugin_is_a_model_error_naming_it(tiny: Path, name: str, message: str) -> None:
    with pytest.raises(ModelError) as err:
        registry.get(name, device="cpu")
    text = str(err.value)
    assert repr(name) in text and message in text
    assert "ainode-tiny-plugin 0.1.0" in text and TINY[name] in text
    # The other pipelines are untouched by it.
    assert isinstance(registry.get("tiny", device="cpu"), TinyPipeline)
    assert name in registry.available()


def test_an_unknown_name_lists_the_known_ones(tiny: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown pipeline 'liver-ct'; known: .*pancreas-ct.*"
                                         r"pancreas-mr.*tiny"):
        registry.get("liver-ct")


def test_two_packages_publishing_one_name_are_refused(tiny: Path) -> None:
    publish(tiny, "ainode-other-plugin", {registry.GROUP: {"tiny": f"{PLUGIN}:factory"}})
    registry.refresh()
    with pytest.raises(ModelError, match="more than one installed package") as err:
        registry.get("tiny")
    assert "ainode-tiny-plugin" in str(err.value) and "ainode-other-plugin" in str(err.value)


def test_a_stale_copy_of_a_distribution_does_not_hide_its_plugins(on_path: Path,
                                                                  tmp_path: Path) -> None:
    """An old metadata copy first on the path (a checkout's egg-info) names no pipelines."""
    publish(on_path, "ainode-tiny-plugin", {registry.GROUP: {"tiny": f"{PLUGIN}:factory"}})
    stale = tmp_path / "stale"
    publish(stale, "ainode_tiny.plugin", {"console_scripts": {"tiny": "x:y"}})
    sys.path.insert(0, str(stale))
    try:
        registry.refresh()
        assert isinstance(registry.get("tiny"), TinyPipeline)
    finally:
        sys.path.remove(str(stale))


def test_in_process_registration_keeps_the_factory_contract() -> None:
    registry.register("test-registry-no-args")(lambda: TinyPipeline(None, "auto"))
    with pytest.raises(ModelError, match=r"registered in process.*must accept the keyword"):
        registry.get("test-registry-no-args")
    registry.register("test-registry-ok")(
        lambda *, models_dir, device: TinyPipeline(models_dir, device))
    built = registry.get("test-registry-ok", device="cpu")
    assert isinstance(built, TinyPipeline) and built.device == "cpu"

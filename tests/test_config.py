"""Configuration: defaults, the example file, environment overrides, and refusals naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import NodeConfig, load_config
from storage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "node.example.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("AINODE_"):
            monkeypatch.delenv(key)


def test_embedded_defaults() -> None:
    cfg = load_config(None)
    assert cfg.dicom.ae_title == "AINODE"
    assert cfg.dicom.port == 11112
    assert cfg.storage.data_dir == Path("data")
    assert cfg.storage.effective_database_url.startswith("sqlite:///")
    assert cfg.storage.effective_database_url.endswith("/data/ainode.db")
    assert cfg.series.stable_age_s == 10
    assert cfg.inference.device == "auto"


def test_example_config_loads_every_section() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.dicom.allowed_callers[0].ae_title == "PACS"
    assert cfg.dicom.allowed_callers[1].hosts == ["127.0.0.1"]
    assert cfg.destinations[0].name == "pacs"
    assert cfg.destinations[0].accepts == ["SEG", "SR", "GSPS"]
    # Every field of the model is spelled out in the example, so admins see all of them.
    text = EXAMPLE.read_text()
    for section, model in NodeConfig.model_fields.items():
        assert f"{section}:" in text
        sub = model.annotation
        fields = getattr(sub, "model_fields", {})
        for key in fields:
            assert f"{key}:" in text, f"{section}.{key} is not documented in the example"


def test_environment_overrides_nested_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AINODE_DICOM__PORT", "4104")
    monkeypatch.setenv("AINODE_STORAGE__DATA_DIR", "/srv/ainode")
    cfg = load_config(EXAMPLE)
    assert cfg.dicom.port == 4104
    assert cfg.dicom.ae_title == "AINODE"  # the rest of the file's section survives
    assert cfg.storage.data_dir == Path("/srv/ainode")


def test_environment_list_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AINODE_DESTINATIONS", '[{"name":"a","ae_title":"A","host":"127.0.0.1","port":104}]'
    )
    assert load_config(None).destinations[0].ae_title == "A"


@pytest.mark.parametrize(
    ("yaml_text", "key", "problem"),
    [
        ("dicom:\n  port: seventy\n", "dicom.port", "valid integer"),
        ("dicom:\n  port: 70000\n", "dicom.port", "less than or equal"),
        ("dicom:\n  ae_tilte: X\n", "dicom.ae_tilte", "unknown key"),
        ("dicom:\n  ae_title: 'WAY_TOO_LONG_AE_TITLE'\n", "dicom.ae_title", "AE title"),
        ("inference:\n  device: gpu\n", "inference.device", "'auto', 'cpu'"),
        ("storages:\n  data_dir: /x\n", "storages", "unknown key"),
        ("dicom:\n  tls:\n    enabled: true\n", "dicom.tls", "cert_file"),
        ("logging:\n  format: xml\n", "logging.format", "keyvalue"),
        (
            "destinations:\n  - {name: a, ae_title: A, host: h, port: 1, accepts: [PDF]}\n",
            "destinations.0.accepts.0",
            "SEG",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, key: str, problem: str) -> None:
    f = tmp_path / "node.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert f"{key}:" in str(err.value)
    assert problem in str(err.value)


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AINODE_SERIES__STABLE_AGE_S", "-3")
    with pytest.raises(ConfigError, match=r"series\.stable_age_s: Input should be greater"):
        load_config(None)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_cli_rejects_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text("series:\n  stable_age: 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(f), "config", "check"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "series.stable_age: unknown key" in proc.stderr

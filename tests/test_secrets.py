"""Secrets from files or the environment, never printed or logged; an owner-only data
directory; the systemd unit that wires both still verifies."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from node.config import load_config
from storage.db import Database
from storage.filestore import FileStore
from tests.support.data import dicom_series_dir
from tests.support.node import AINODE, REPO, start_node
from tests.support.peers import dcmtk_env, require

SECRET = "s3cr3t-issue-19"


def test_data_directory_is_owner_only(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    FileStore(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    FileStore(loose)
    assert loose.stat().st_mode & 0o777 == 0o700  # tightened at start


def test_database_password_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "db_password"
    secret.write_text(SECRET + "\n")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {
        "database_url": "postgresql://ainode@db.example/ainode",
        "database_password_file": str(secret)}}))
    url = load_config(cfg).storage.effective_database_url
    assert f"ainode:{SECRET}@db.example" in url
    assert SECRET not in Database(url).safe_url
    monkeypatch.setenv("AINODE_STORAGE__DATABASE_PASSWORD", "from-env")
    conf = load_config(cfg)
    assert "ainode:from-env@" in conf.storage.effective_database_url  # environment wins
    assert "from-env" not in repr(conf) and "from-env" not in conf.model_dump_json()
    monkeypatch.delenv("AINODE_STORAGE__DATABASE_PASSWORD")
    r = subprocess.run([*AINODE, "--config", str(cfg), "config", "show"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and SECRET not in r.stdout + r.stderr


def test_a_running_node_never_logs_its_database_password(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL here trusts loopback, so any password connects: the node runs with one
    from a file, receives a series, and the secret is nowhere in its log."""
    secret = tmp_path / "db_password"
    secret.write_text(SECRET)
    node = start_node(tmp_path, workers=2, serve_args=("--no-jobs",), extra={"storage": {
        "data_dir": str(tmp_path / "node-data"), "min_free_mb": 0,
        "database_url": postgres_url, "database_password_file": str(secret)},
        "logging": {"level": "DEBUG"}})
    try:
        r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE", "+sd",
                            "127.0.0.1", str(node.port),
                            str(dicom_series_dir("ct_phantom_philips"))],
                           env=dcmtk_env(), capture_output=True, timeout=300)
        assert r.returncode == 0
    finally:
        node.stop()
    text = node.log.read_text()
    assert "DICOM receiver listening" in text
    assert SECRET not in text


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "ainode.service").read_text()
    ainode = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "ainode"
    local = tmp_path / "ainode.service"
    local.write_text(unit.replace("/opt/ainode/.venv/bin/ainode", str(ainode)))
    r = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                       timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "ainode.service" in line]
    assert not problems, problems
    assert "UMask=0077" in unit and "StateDirectoryMode=0700" in unit


def test_an_encrypted_tls_key_opens_with_its_passphrase_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.config import NodeConfig
    from node.network.tls import server_context
    from storage.errors import ConfigError

    d = tmp_path / "pki"
    d.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1",
                    "-subj", "/CN=node", "-keyout", "node.key", "-out", "node.crt",
                    "-passout", f"pass:{SECRET}"], cwd=d, check=True, capture_output=True,
                   timeout=60)
    pw = tmp_path / "tls_key_password"
    pw.write_text(SECRET + "\n")
    tls = {"enabled": True, "cert_file": str(d / "node.crt"), "key_file": str(d / "node.key")}
    assert server_context(NodeConfig(dicom={"tls": {**tls, "key_password_file": str(pw)}})
                          .dicom.tls) is not None
    monkeypatch.setenv("AINODE_DICOM__TLS__KEY_PASSWORD", SECRET)
    assert server_context(NodeConfig(dicom={"tls": tls}).dicom.tls) is not None
    monkeypatch.setenv("AINODE_DICOM__TLS__KEY_PASSWORD", "wrong")
    with pytest.raises(ConfigError) as err:
        server_context(NodeConfig(dicom={"tls": tls}).dicom.tls)
    assert SECRET not in str(err.value) and "wrong" not in str(err.value)

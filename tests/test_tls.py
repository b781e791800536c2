"""DICOM TLS on the receiver, against dcmtk's TLS client (echoscu/storescu +tls).

Certificates come from openssl in the test: a CA, the node's certificate and a
client certificate. Two receiver processes, so connections served in the main
process and connections handed to the other one (the TLS handshake happens
after the hand-over) are both exercised.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.data import dicom_series_dir
from tests.support.net import free_port, wait_for
from tests.support.node import AINODE, REPO
from tests.support.peers import dcmtk_env, require


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name in ("node", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", str(ext),
                 cwd=d)
    return d


def _tls_args(pki: Path, client_cert: bool = True) -> list[str]:
    auth = ["+tls", str(pki / "client.key"), str(pki / "client.crt")] if client_cert \
        else ["+tla"]
    return [*auth, "+cf", str(pki / "ca.crt")]


def _echo(port: int, args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([require("echoscu"), *args, "-aet", "ECHOSCU", "-aec", "AINODE",
                           "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True,
                          timeout=60)


def test_tls_associations_in_both_receiver_processes(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "allowed_callers": ["ECHOSCU", "STORESCU"],
                  "tls": {"enabled": True, "cert_file": str(pki / "node.crt"),
                          "key_file": str(pki / "node.key"), "ca_file": str(pki / "ca.crt"),
                          "require_peer_cert": True}},
        "storage": {"data_dir": str(data), "min_free_mb": 0},
        "logging": {"level": "INFO"},
    }))
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen([*AINODE, "--config", str(cfg), "serve", "--workers", "2",
                             "--no-jobs"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: _echo(port, _tls_args(pki)).returncode == 0, timeout=90,
                 what="the node over TLS")
        # Without TLS, or without a client certificate the node's CA signed: refused.
        assert _echo(port, []).returncode != 0
        assert _echo(port, _tls_args(pki, client_cert=False)).returncode != 0
        # Two senders at once: one is served by each receiver process.
        series = [dicom_series_dir("ct_phantom_philips"), dicom_series_dir("mr_head_ge_3dt1")]
        senders = [subprocess.Popen([require("storescu"), *_tls_args(pki), "-aet", "STORESCU",
                                     "-aec", "AINODE", "+sd", "-R", "127.0.0.1", str(port),
                                     str(s)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
                   for s in series]
        for s in senders:
            _, err = s.communicate(timeout=300)
            assert s.returncode == 0, err.decode()[-2000:]
        expected = sum(1 for s in series for p in s.rglob("*") if p.is_file())
        deadline = time.monotonic() + 30
        while True:
            with sqlite3.connect(data / "ainode.db") as conn:
                n = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
            if n == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert n == expected
        assert len(list((data / "spool").rglob("*.dcm"))) == expected
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()

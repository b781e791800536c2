"""DICOM TLS on the receiver, against dcmtk's TLS client (echoscu/storescu +tls).

Certificates come from openssl in the test: a CA, the node's certificate and a
client certificate. Two receiver processes, so connections served in the main
process and connections handed to the other one (the TLS handshake happens
after the hand-over) are both exercised.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.data import dicom_series_dir
from tests.support.net import free_port, wait_for
from tests.support.node import AINODE, REPO
from tests.support.peers import dcmtk_env, require
from tests.support.pki import make_pki


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


def _audit_reasons(data: Path) -> list[str]:
    with sqlite3.connect(data / "ainode.db") as conn:
        rows = conn.execute(
            "SELECT details FROM audit_events WHERE event = 'tls.refused' ORDER BY id").fetchall()
    return [json.loads(r[0])["reason"] for r in rows]


def _s_client(port: int, pki: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki / "ca.crt"),
         "-cert", str(pki / "client.crt"), "-key", str(pki / "client.key"), *extra],
        input="", capture_output=True, text=True, timeout=60)


def test_tls_refusals_are_audited_and_a_silent_peer_blocks_nobody(
    tmp_path: Path
) -> None:
    """Against the BCP 195 profile: plain TCP to the TLS port, a client certificate from
    a CA the node does not trust, an expired one, TLS 1.0 and 1.1, and a TLS 1.2 suite
    outside the profile are each refused and audited (tls.refused, with the reason); a
    default client gets TLS 1.3; a connection that never starts its handshake neither
    holds up another client nor stays open past the ACSE timeout."""
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "allowed_callers": ["ECHOSCU"], "acse_timeout_s": 2.0,
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
        silent = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        assert _echo(port, _tls_args(pki)).returncode == 0  # served while `silent` waits
        assert time.monotonic() - start < 2.0
        silent.settimeout(10)
        assert silent.recv(1024) == b""  # the node closes it at the ACSE timeout
        assert time.monotonic() - start < 6
        silent.close()

        cases: dict[str, subprocess.CompletedProcess[Any]] = {
            "plain": _echo(port, []),
            "untrusted": _echo(port, ["+tls", str(pki / "stranger.key"),
                                      str(pki / "stranger.crt"), "+cf", str(pki / "ca.crt")]),
            "expired": _echo(port, ["+tls", str(pki / "expired.key"), str(pki / "expired.crt"),
                                    "+cf", str(pki / "ca.crt")]),
            "tls1": _s_client(port, pki, "-tls1", "-cipher", "DEFAULT@SECLEVEL=0"),
            "tls1_1": _s_client(port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"),
            "weak_suite": _s_client(port, pki, "-tls1_2", "-cipher", "AES128-SHA"),
        }
        for name, r in cases.items():
            assert r.returncode != 0, f"{name} was not refused"
        best = _s_client(port, pki)
        assert "Protocol  : TLSv1.3" in best.stdout or "TLSv1.3" in best.stdout, best.stdout
        reasons = wait_for(lambda: (lambda r: r if len(r) >= 7 else None)(_audit_reasons(data)),
                           timeout=20, what="seven tls.refused audit rows")
        assert reasons == [
            "handshake timed out",  # the silent connection
            "wrong version number",  # plain TCP: an A-ASSOCIATE-RQ where a ClientHello belongs
            "certificate: unable to get local issuer certificate",  # the rogue CA's
            "certificate: certificate has expired",
            "unsupported protocol", "unsupported protocol",  # TLS 1.0, 1.1
            "no shared cipher",  # TLS 1.2 with a suite outside the profile
        ]
        # The node is still serving after all of it.
        assert _echo(port, _tls_args(pki)).returncode == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_sending_to_a_tls_destination_uses_the_profile(tmp_path: Path) -> None:
    """The node as the TLS client: C-ECHO and a C-STORE of real slices to dcmtk's
    storescp +tls, which requires our certificate; a destination whose certificate
    our CA did not sign is refused."""
    import pydicom

    from node.send.scu import Peer, associate, contexts_for, echo_peer, store
    from storage.errors import TransferError

    pki = make_pki(tmp_path / "pki")
    for server, ok in (("node", True), ("stranger", False)):
        port = free_port()
        out = tmp_path / f"received-{server}"
        out.mkdir()
        scp = subprocess.Popen(
            [require("storescp"), "+tls", str(pki / f"{server}.key"), str(pki / f"{server}.crt"),
             "+cf", str(pki / "ca.crt"), "-od", str(out), "-aet", "DEST", str(port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda p=port: _port_open(p), timeout=30, what="storescp +tls")
            peer = Peer(name="dest", ae_title="DEST", host="127.0.0.1", port=port,
                        calling_ae_title="AINODE", tls=True, cert_file=pki / "client.crt",
                        key_file=pki / "client.key", ca_file=pki / "ca.crt")
            if ok:
                assert echo_peer(peer) == 0
                slices = sorted(dicom_series_dir("ct_phantom_philips").iterdir())[:3]
                sent = [pydicom.dcmread(p) for p in slices]
                with associate(peer, contexts_for(sent)) as assoc:
                    assert [store(assoc, ds) for ds in sent] == [0, 0, 0]
                got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
                assert got == {ds.SOPInstanceUID for ds in sent}
            else:
                with pytest.raises(TransferError):
                    echo_peer(peer)
        finally:
            scp.terminate()
            scp.wait(timeout=30)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True

"""Certificates made by the test with the openssl CLI: a CA, leaf certificates signed by it,
an expired one, and a second CA nobody trusts."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["make_pki"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, days: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", days, "-out", f"{name}.crt", "-extfile", str(ext),
             cwd=d)


def make_pki(d: Path) -> Path:
    """``ca``, ``node``, ``client`` (signed by ca), ``expired`` (signed by ca, expired a day
    ago), ``rogue_ca`` and ``stranger`` (signed by rogue_ca): .crt and .key each."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue_ca")
    for name in ("node", "client", "syslog"):
        _leaf(d, name, "ca", "2")
    _leaf(d, "expired", "ca", "-1")
    _leaf(d, "stranger", "rogue_ca", "2")
    return d

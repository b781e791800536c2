"""TLS for associations (the DICOM secure transport connection profile, PS3.15 B.9).

Why these settings: the BCP 195 profile PS3.15 B.9 references asks for TLS
1.2 as the floor with TLS 1.3 preferred, forward-secret AEAD suites only
(the profile's TLS_ECDHE/DHE_*_WITH_AES_*_GCM_* for TLS 1.2; TLS 1.3's own
suites are all AEAD), no compression and no renegotiation. Older versions
and weaker suites are refused even if a peer offers them. The same context
rules serve the receiver and the sender (``client_context``), so a node
talks to a TLS destination as strictly as it lets peers talk to it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config import TLSConfig
from storage.errors import ConfigError

__all__ = ["BCP195_CIPHERS", "client_context", "handshake_reason", "server_context"]

# TLS 1.2 suites of the BCP 195 profile (RFC 9325 4.2), OpenSSL names.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))


def _profile(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SSLContext for the listening side, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        assert tls.cert_file is not None and tls.key_file is not None  # validated by config
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=tls.passphrase())
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom.tls: cannot load certificate, key or CA file: {exc}") from exc
    if tls.require_peer_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                   key_password: str | None = None) -> ssl.SSLContext:
    """The SSLContext for sending to a TLS destination: the server's certificate verified
    against ``ca_file`` (the system store without one), our certificate when configured."""
    ctx = _profile(ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None))
    if cert_file and key_file:
        ctx.load_cert_chain(str(cert_file), str(key_file), password=key_password)
    return ctx


def handshake_reason(exc: BaseException) -> str:
    """A short, PHI-free reason for a failed handshake, for the audit row."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return exc.__class__.__name__

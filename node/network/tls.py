"""TLS for associations (the DICOM secure transport connection profile, PS3.15 B).

Why TLS 1.2 as the floor: that is what the BCP 195 profiles referenced by
PS3.15 require; older versions are refused even if a peer offers them.
"""

from __future__ import annotations

import ssl

from node.config import TLSConfig
from storage.errors import ConfigError

__all__ = ["server_context"]


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SSLContext for the listening side, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        assert tls.cert_file is not None and tls.key_file is not None  # validated by config
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
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

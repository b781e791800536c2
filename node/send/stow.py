"""STOW-RS to a DICOMweb destination: the results of a job as one multipart/related POST.

Why the same Transfer rows as the C-STORE sender: retries, backoff, the give-up
ceiling and the audit trail are the sender's (node.send); only the wire
differs. Each instance's outcome is read from the response (PS3.18 10.5.3):
in ReferencedSOPSequence it is sent, in FailedSOPSequence it failed with the
FailureReason as its status; a response that names neither, or an HTTP
error, fails all of them for a later retry.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import httpx

from storage.errors import TransferError
from storage.models import Destination

__all__ = ["StowOutcome", "probe", "stow"]

TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class StowOutcome:
    ok: bool
    status: int | None  # FailureReason, or None when no per-instance answer came
    error: str | None


def _url(dest: Destination) -> str:
    if not dest.url:
        raise TransferError(f"{dest.name}: a dicomweb destination without a url")
    return dest.url.rstrip("/")


def stow(dest: Destination, instances: list[tuple[str, bytes]]) -> dict[str, StowOutcome]:
    """POST (SOP Instance UID, Part 10 bytes) pairs; each UID's outcome.

    TransferError when the server cannot be reached or answers no DICOM JSON.
    """
    boundary = "ainode-" + secrets.token_hex(12)
    chunks: list[bytes] = []
    for _, data in instances:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data,
                   b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={boundary}",
               "Accept": "application/dicom+json"}
    try:
        resp = httpx.post(f"{_url(dest)}/studies", content=b"".join(chunks), headers=headers,
                          timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise TransferError(f"{dest.name}: STOW-RS failed: {exc}") from exc
    try:
        body = resp.json() if resp.content else {}
    except (json.JSONDecodeError, ValueError):
        body = {}
    if isinstance(body, list):  # some servers wrap the one response data set in a list
        body = body[0] if body else {}
    done: dict[str, StowOutcome] = {}
    for item in (body.get("00081199") or {}).get("Value", []):
        uid = ((item.get("00081155") or {}).get("Value") or [None])[0]
        if uid:
            done[uid] = StowOutcome(True, 0, None)
    for item in (body.get("00081198") or {}).get("Value", []):
        uid = ((item.get("00081155") or {}).get("Value") or [None])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
        if uid:
            done[uid] = StowOutcome(False, reason, f"STOW-RS failure reason "
                                    f"0x{int(reason or 0):04X} (HTTP {resp.status_code})")
    for uid, _ in instances:
        if uid not in done:
            done[uid] = StowOutcome(False, None, f"STOW-RS HTTP {resp.status_code}: no "
                                    "outcome for this instance")
    return done


def probe(dest: Destination) -> None:
    """The DICOMweb analogue of C-ECHO: a QIDO-RS search answered (any 2xx)."""
    try:
        resp = httpx.get(f"{_url(dest)}/studies", params={"limit": "1"},
                         headers={"Accept": "application/dicom+json"}, timeout=10.0)
    except httpx.HTTPError as exc:
        raise TransferError(f"{dest.name}: cannot reach {dest.url}: {exc}") from exc
    if resp.status_code >= 300:
        raise TransferError(f"{dest.name}: QIDO-RS answered HTTP {resp.status_code}")

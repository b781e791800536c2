"""DIMSE status codes the receiver answers with (PS3.4 B.2.3, PS3.7 C).

Failure codes are chosen so that a PACS operator can tell the causes apart in
the sender's log: no space (retry later), bad dataset (fix the sender),
conflicting duplicate (investigate), internal error (our bug).
"""

from __future__ import annotations

__all__ = [
    "BAD_IDENTIFIERS",
    "DUPLICATE_CONFLICT",
    "INTERNAL_ERROR",
    "OUT_OF_RESOURCES",
    "STORAGE_FAILURE",
    "SUCCESS",
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # free space below the floor; nothing written
STORAGE_FAILURE = 0xA701  # the spool or the database refused the write
DUPLICATE_CONFLICT = 0x0111  # PS3.7: Duplicate SOP Instance (different content)
BAD_IDENTIFIERS = 0xC210  # Cannot understand: missing/invalid UIDs or unparseable data
INTERNAL_ERROR = 0xC211  # an unexpected exception in the handler (pynetdicom's choice too)

"""Persisting one received instance: spool file, database rows and audit row.

Why this lives apart from the network code: the C-STORE handler must only
persist, and everything that decides *what* to persist (duplicate or
conflict, which series, reopening a completed series) is storage policy that
the tests exercise without an association.

The order is what makes an acknowledgement safe:

1. refuse before writing anything (free-space floor, missing or invalid UIDs);
2. write the bytes as received, atomically and fsynced (``FileStore``: the
   file's data, then its directory entry);
3. one transaction: upsert study and series, insert the instance, reopen the
   series if it was already complete, add the audit row, commit (fsynced);
4. only then may the caller acknowledge.

Speed without weakening 2-4 (see bench/RESULTS.md): there is no look-up
before the write (an existing file or the insert's ON CONFLICT reveals a
repeat), the statements are compiled once (``statements``), and step 3 goes
through one commit thread per process (``committer``) so that rows of
concurrent associations share a transaction and its fsync while each sender
still waits for its own row to be durable.

A crash between 2 and 3 leaves a complete file without a row; the sender saw
no acknowledgement and sends again, and the retry finds the file with the same
hash and records it. A file is never replaced: a different dataset under a
stored SOP Instance UID goes to quarantine and raises ConflictError.

The modules, by what they do: ``header`` (the few attributes read from the
bytes, and the routing keywords), ``statements`` (the SQL), ``committer``
(the commit thread), ``ingestor`` (the policy above), ``recovery`` (the
start-up check of the last rows before an unclean stop).
"""

from storage.ingest.committer import Peer
from storage.ingest.header import (
    ROUTING_KEYWORDS,
    InstanceHeader,
    header_attributes,
    read_file_header,
    read_header,
    routing_attributes,
)
from storage.ingest.ingestor import Ingestor, IngestOutcome, IngestResult
from storage.ingest.recovery import sweep_unrecorded, verify_recent

__all__ = [
    "ROUTING_KEYWORDS",
    "IngestOutcome",
    "IngestResult",
    "Ingestor",
    "InstanceHeader",
    "Peer",
    "header_attributes",
    "read_file_header",
    "read_header",
    "routing_attributes",
    "sweep_unrecorded",
    "verify_recent",
]

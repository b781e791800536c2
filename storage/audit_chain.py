"""The audit trail's hash chain: every sealed row carries the hash of the one before it.

Why sealing after the commit rather than at insert: audit rows are written by
every receiver process's commit thread, by the scheduler and by CLI commands,
concurrently and on two databases; chaining at insert would serialise all of
them on the chain's head. Instead one sealer (the node's scheduler, a second
after the rows commit) takes the unsealed rows in id order under a lock and
gives each a ``chain_seq``, the previous row's hash and its own:

    row_hash = sha256(prev_hash + "\\n" + canonical JSON of the row's content)

Checkpoints record the head of the chain every ``checkpoint_every`` rows and
whenever the sealer is asked to (periodically); with a key (kept outside the
database: a file or the environment) each carries an HMAC, so rewriting the
whole chain after an edit is caught at the last checkpoint. Without a key a
checkpoint is only as good as where it was published (the log, syslog).

``verify`` walks the chain and names each row that was edited (its hash no
longer matches), deleted (a gap in ``chain_seq``, or a row whose
``prev_hash`` is not its predecessor's hash) or inserted (an unsealed row
older than sealed ones, or a row whose links do not fit).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from storage.models import AuditCheckpoint, AuditEvent

__all__ = ["GENESIS", "ChainReport", "Problem", "canonical", "row_hash", "seal", "verify"]

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_FIELDS = ("id", "ts", "event", "outcome", "actor", "host", "study_uid", "series_uid",
           "sop_instance_uid", "job_id", "details")
_LOCK_KEY = 190019  # PostgreSQL advisory lock: one sealer at a time across processes


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def canonical(row: AuditEvent) -> bytes:
    """The row's content as bytes that read back the same from SQLite and PostgreSQL."""
    content: dict[str, Any] = {f: getattr(row, f) for f in _FIELDS}
    content["ts"] = _ts(row.ts)
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str,
                      ensure_ascii=True).encode()


def row_hash(prev_hash: str, row: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(row)).hexdigest()


def _mac(key: bytes | None, seq: int, head: str) -> str | None:
    if not key:
        return None
    return hmac.new(key, f"{seq}:{head}".encode(), hashlib.sha256).hexdigest()


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    else:  # SQLite: take the write lock now, before reading the head
        session.execute(text("UPDATE audit_cursors SET chain_seq = chain_seq WHERE 0"))


@dataclass(frozen=True, slots=True)
class Sealed:
    rows: int
    head_seq: int
    checkpoint: AuditCheckpoint | None


def seal(session: Session, *, key: bytes | None = None, checkpoint_every: int = 1000,
         checkpoint: bool = False, batch: int = 5000) -> Sealed:
    """Seal the unsealed rows (oldest id first) onto the chain; checkpoint when due.

    ``checkpoint``: write a checkpoint of the head even if ``checkpoint_every``
    rows have not passed since the last one (the periodic one); none is
    written when nothing was sealed since the last checkpoint.
    """
    _lock(session)
    head = session.execute(
        select(AuditEvent.chain_seq, AuditEvent.row_hash)
        .where(AuditEvent.chain_seq.is_not(None))
        .order_by(AuditEvent.chain_seq.desc()).limit(1)
    ).first()
    seq, prev = (int(head[0] or 0), str(head[1])) if head is not None else (0, GENESIS)
    rows = list(session.scalars(
        select(AuditEvent).where(AuditEvent.chain_seq.is_(None))
        .order_by(AuditEvent.id).limit(batch)
    ))
    last_cp = session.scalar(select(func.max(AuditCheckpoint.chain_seq))) or 0
    made: AuditCheckpoint | None = None
    for row in rows:
        seq += 1
        row.chain_seq, row.prev_hash = seq, prev
        prev = row.row_hash = row_hash(prev, row)
        if checkpoint_every and seq - last_cp >= checkpoint_every:
            made = AuditCheckpoint(chain_seq=seq, row_hash=prev, mac=_mac(key, seq, prev))
            session.add(made)
            last_cp = seq
        session.flush()
    if checkpoint and seq > last_cp:
        made = AuditCheckpoint(chain_seq=seq, row_hash=prev, mac=_mac(key, seq, prev))
        session.add(made)
    session.flush()
    if made is not None:
        log.info("audit chain checkpoint", extra={"chain_seq": made.chain_seq,
                                                  "row_hash": made.row_hash})
    return Sealed(len(rows), seq, made)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # edited | deleted | inserted | checkpoint
    audit_id: int | None
    chain_seq: int | None
    message: str


@dataclass(slots=True)
class ChainReport:
    sealed: int = 0
    pending: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _chain(session: Session) -> Iterator[AuditEvent]:
    q = (select(AuditEvent).where(AuditEvent.chain_seq.is_not(None))
         .order_by(AuditEvent.chain_seq).execution_options(yield_per=2000))
    yield from session.scalars(q)


def verify(session: Session, *, key: bytes | None = None,
           grace: timedelta = timedelta(minutes=2)) -> ChainReport:
    """Walk the chain from its start; name every row that breaks it (read-only)."""
    report = ChainReport()
    expected_seq, prev = 1, GENESIS
    prev_id: int | None = None
    hashes: dict[int, str] = {}
    max_sealed_id, newest_sealed_ts = 0, None
    for row in _chain(session):
        seq = int(row.chain_seq or 0)
        report.sealed += 1
        if seq != expected_seq:
            report.problems.append(Problem(
                "deleted", row.id, seq,
                f"rows with chain_seq {expected_seq}..{seq - 1} are missing "
                f"(deleted between audit id {prev_id} and {row.id})"))
        actual = row_hash(row.prev_hash or "", row)
        if actual != row.row_hash:
            report.problems.append(Problem(
                "edited", row.id, seq,
                f"audit id {row.id} (chain_seq {seq}) was edited: its content no longer "
                "matches its hash"))
        elif row.prev_hash != prev and seq == expected_seq:
            report.problems.append(Problem(
                "inserted", row.id, seq,
                f"audit id {row.id} (chain_seq {seq}) does not follow the row before it: "
                "a row was replaced or inserted here"))
        prev = row.row_hash or ""
        hashes[seq] = prev
        expected_seq, prev_id = seq + 1, row.id
        max_sealed_id = max(max_sealed_id, row.id)
        newest_sealed_ts = row.ts if newest_sealed_ts is None else max(newest_sealed_ts, row.ts)
    unsealed = session.execute(
        select(AuditEvent.id, AuditEvent.ts).where(AuditEvent.chain_seq.is_(None))
        .order_by(AuditEvent.id)
    ).all()
    for audit_id, ts in unsealed:
        late = newest_sealed_ts is not None and ts < newest_sealed_ts - grace
        if audit_id < max_sealed_id and late:
            report.problems.append(Problem(
                "inserted", audit_id, None,
                f"audit id {audit_id} is not on the chain but older rows after it are: "
                "inserted after sealing"))
        else:
            report.pending += 1
    for cp in session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.chain_seq)):
        report.checkpoints += 1
        have = hashes.get(int(cp.chain_seq))
        if have != cp.row_hash:
            report.problems.append(Problem(
                "checkpoint", None, cp.chain_seq,
                f"checkpoint at chain_seq {cp.chain_seq} does not match the chain: rows up to "
                "it were rewritten or removed"))
        elif key and cp.mac != _mac(key, int(cp.chain_seq), cp.row_hash):
            report.problems.append(Problem(
                "checkpoint", None, cp.chain_seq,
                f"checkpoint at chain_seq {cp.chain_seq} has no valid HMAC under the "
                "configured key: the chain was rebuilt"))
    return report

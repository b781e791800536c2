"""Sending results to PACS: a queue of Transfer rows worked off with retries.

Why a queue of rows: an output is "sent" only when a destination answered
C-STORE with success, and a node that restarts must resume exactly the
transfers that were not. Each (output, destination) pair is one Transfer row
with its attempts, last DIMSE status, error and next attempt time; each
outcome is also an audit event. A destination that is down is retried with
exponential backoff up to a ceiling (``base * 2**attempts``, at most
``ceiling``) and given up after ``max_attempts``; it never holds up the
others, because each destination gets its own association in turn and its
failure is recorded, not raised.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import NodeConfig, SendConfig
from node.send.scu import Peer, associate, contexts_for, echo_peer, store
from storage.audit import audit
from storage.db import Database
from storage.errors import InputError, TransferError
from storage.filestore import FileStore
from storage.models import Destination, Output, Transfer, TransferState, utcnow

__all__ = [
    "RetryPolicy",
    "SendReport",
    "echo",
    "peer_for",
    "queue_outputs",
    "send_due",
]

log = logging.getLogger(__name__)

# DIMSE statuses a C-STORE SCP uses for "stored, with a warning" (PS3.4 B.2.3).
_WARNING_STATUSES = {0xB000, 0xB006, 0xB007}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with a ceiling, a limit on attempts, and jitter.

    Jitter: each wait is shortened by a random fraction up to ``jitter``, so
    the transfers that failed together (a destination down) do not all come
    back in the same second when it returns; never longer than the ceiling.
    """

    base_s: float = 30.0
    ceiling_s: float = 3600.0
    max_attempts: int = 20
    jitter: float = 0.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: SendConfig) -> RetryPolicy:
        return cls(base_s=cfg.retry_base_s, ceiling_s=cfg.retry_ceiling_s,
                   max_attempts=cfg.retry_max_attempts, jitter=cfg.retry_jitter)

    def delay(self, attempts: int) -> timedelta:
        """Wait before the next try after ``attempts`` failed ones."""
        wait = min(self.base_s * 2 ** max(attempts - 1, 0), self.ceiling_s)
        if self.jitter:
            wait *= 1.0 - self.jitter * self.rng.random()
        return timedelta(seconds=wait)


@dataclass
class SendReport:
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    per_destination: dict[str, dict[str, int]] = field(default_factory=dict)

    def _count(self, dest: str, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        d = self.per_destination.setdefault(dest, {"sent": 0, "retrying": 0, "failed": 0})
        d[what] += 1


def queue_outputs(session: Session, outputs: Sequence[Output],
                  destination_names: Sequence[str]) -> list[Transfer]:
    """A pending Transfer per (output, destination) whose kind that destination accepts.

    Already-queued pairs are returned as they are (queuing is idempotent).
    InputError for a destination name that is unknown or disabled.
    """
    dests = []
    for name in destination_names:
        row = session.scalars(select(Destination).where(Destination.name == name)).one_or_none()
        if row is None or not row.enabled:
            raise InputError(f"unknown or disabled destination {name!r}")
        dests.append(row)
    transfers = []
    for dest in dests:
        accepts = {str(k).upper() for k in dest.accepts}
        for out in outputs:
            if out.kind.upper() not in accepts:
                continue
            existing = session.scalars(select(Transfer).where(
                Transfer.output_id == out.id, Transfer.destination_id == dest.id)).one_or_none()
            if existing is not None:
                transfers.append(existing)
                continue
            t = Transfer(output_id=out.id, destination_id=dest.id, state=TransferState.PENDING,
                         next_attempt_at=utcnow())
            session.add(t)
            transfers.append(t)
    session.flush()
    return transfers


def peer_for(dest: Destination, config: NodeConfig) -> Peer:
    """The destination with the node's AE title, timeouts and TLS files filled in."""
    d, tls = config.dicom, config.dicom.tls
    return Peer(
        name=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port,
        calling_ae_title=dest.calling_ae_title or d.ae_title, tls=dest.tls,
        cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tls.ca_file,
        key_password=tls.passphrase(),
        acse_timeout_s=d.acse_timeout_s, dimse_timeout_s=d.dimse_timeout_s,
        network_timeout_s=d.network_timeout_s,
    )


def echo(destination: Destination, config: NodeConfig | None = None) -> bool:
    """C-ECHO one destination: True on success; TransferError when it cannot be reached."""
    status = echo_peer(peer_for(destination, config or NodeConfig()))
    if status != 0:
        raise TransferError(f"{destination.name}: C-ECHO status 0x{status:04X}")
    return True


@dataclass
class _Item:
    transfer_id: int
    output_id: int
    sop_instance_uid: str  # of the output object
    output_series_uid: str  # the SEG/SR/... series the node wrote
    series_uid: str | None  # the source series: the audit trail is keyed by it
    study_uid: str | None
    job_id: int
    path: str
    attempts: int


def _due(db: Database, now: datetime) -> dict[int, list[_Item]]:
    with db.session() as s:
        rows = s.execute(
            select(Transfer, Output)
            .join(Output, Transfer.output_id == Output.id)
            .join(Destination, Transfer.destination_id == Destination.id)
            .where(Transfer.state == TransferState.PENDING, Transfer.next_attempt_at <= now,
                   Destination.enabled.is_(True))
            .order_by(Transfer.destination_id, Transfer.id)
        ).all()
        grouped: dict[int, list[_Item]] = defaultdict(list)
        for t, out in rows:
            source = out.job.series
            grouped[t.destination_id].append(_Item(
                t.id, out.id, out.sop_instance_uid, out.series_instance_uid,
                source.series_instance_uid if source else None,
                source.study.study_instance_uid if source else None,
                out.job_id, out.path, t.attempts))
        return dict(grouped)


def _record(db: Database, item: _Item, dest_name: str, *, ok: bool, status: int | None,
            error: str | None, now: datetime, policy: RetryPolicy, report: SendReport,
            warning: bool = False) -> None:
    with db.session() as s:
        t = s.get(Transfer, item.transfer_id)
        if t is None:  # removed meanwhile (destination deleted)
            return
        t.attempts += 1
        t.last_status = status
        attempt, given_up, next_at = t.attempts, False, None
        ids: dict[str, Any] = {"study_uid": item.study_uid, "series_uid": item.series_uid,
               "sop_instance_uid": item.sop_instance_uid, "job_id": item.job_id,
               "output_series_uid": item.output_series_uid}
        if ok:
            t.state = TransferState.SENT
            t.sent_at = now
            t.error = None
            audit(s, "transfer.sent", outcome="warning" if warning else "success",
                  actor="sender", destination=dest_name, attempt=t.attempts,
                  status=status, transfer_id=t.id, **ids)
            report._count(dest_name, "sent")
            _log_outcome(item, dest_name, ok=True, status=status, error=None, attempt=attempt,
                         given_up=False, next_at=None)
            return
        t.error = error
        if t.attempts >= policy.max_attempts:
            t.state = TransferState.FAILED
            given_up = True
            audit(s, "transfer.failed", outcome="failure", actor="sender",
                  destination=dest_name, attempt=t.attempts, status=status, error=error,
                  transfer_id=t.id, **ids)
            report._count(dest_name, "failed")
        else:
            t.next_attempt_at = now + policy.delay(t.attempts)
            next_at = t.next_attempt_at
            audit(s, "transfer.retry", outcome="failure", actor="sender",
                  destination=dest_name, attempt=t.attempts, status=status, error=error,
                  next_attempt_at=t.next_attempt_at.isoformat(), transfer_id=t.id, **ids)
            report._count(dest_name, "retrying")
    _log_outcome(item, dest_name, ok=False, status=status, error=error, attempt=attempt,
                 given_up=given_up, next_at=next_at)


def _log_outcome(item: _Item, dest_name: str, *, ok: bool, status: int | None,
                 error: str | None, attempt: int, given_up: bool,
                 next_at: datetime | None) -> None:
    """One line per outcome, with the reason: the admin reads the log before the audit."""
    extra: dict[str, Any] = {
        "transfer_id": item.transfer_id, "destination": dest_name, "attempt": attempt,
        "status": None if status is None else f"0x{status:04X}", "job_id": item.job_id,
        "sop_instance_uid": item.sop_instance_uid}
    if ok:
        msg = "transfer sent" if attempt == 1 else f"transfer sent on retry (attempt {attempt})"
        log.info(msg, extra=extra)
    elif given_up:
        log.error(f"transfer failed, giving up: {error}", extra=extra)
    else:
        extra["next_attempt_at"] = None if next_at is None else next_at.isoformat(
            timespec="seconds")
        log.warning(f"transfer not sent, will retry: {error}", extra=extra)


def _send_dicomweb(db: Database, store_: FileStore, dest: Destination, items: list[_Item],
                   now: datetime, policy: RetryPolicy, report: SendReport) -> None:
    """The same Transfer rows and retries, over STOW-RS (node.send.stow)."""
    from node.send.stow import stow

    loaded: list[tuple[_Item, bytes]] = []
    for item in items:
        try:
            loaded.append((item, store_.result_path(item.path).read_bytes()))
        except OSError as exc:
            _record(db, item, dest.name, ok=False, status=None, now=now, policy=policy,
                    report=report, error=f"cannot read result file: {exc}")
    if not loaded:
        return
    try:
        outcomes = stow(dest, [(item.sop_instance_uid, data) for item, data in loaded])
    except TransferError as exc:
        for item, _ in loaded:
            _record(db, item, dest.name, ok=False, status=None, now=now, policy=policy,
                    report=report, error=str(exc))
        return
    for item, _ in loaded:
        o = outcomes[item.sop_instance_uid]
        _record(db, item, dest.name, ok=o.ok, status=o.status, error=o.error, now=now,
                policy=policy, report=report)


def _send_destination(db: Database, store_: FileStore, dest: Destination, peer: Peer,
                      items: list[_Item], now: datetime, policy: RetryPolicy,
                      report: SendReport) -> None:
    loaded: list[tuple[_Item, pydicom.Dataset]] = []
    for item in items:
        try:
            ds: pydicom.Dataset = pydicom.dcmread(store_.result_path(item.path))
        except (OSError, InvalidDicomError) as exc:
            _record(db, item, dest.name, ok=False, status=None, now=now, policy=policy,
                    report=report, error=f"cannot read result file: {exc}")
            continue
        loaded.append((item, ds))
    if not loaded:
        return
    recorded: set[int] = set()

    def record(item: _Item, **kw: Any) -> None:
        recorded.add(item.transfer_id)
        _record(db, item, dest.name, now=now, policy=policy, report=report, **kw)

    try:
        with associate(peer, contexts_for([ds for _, ds in loaded])) as assoc:
            for item, ds in loaded:
                if not assoc.is_established:
                    raise TransferError(f"{dest.name}: association lost")
                status = store(assoc, ds)
                ok = status is not None and (status == 0 or status in _WARNING_STATUSES)
                record(item, ok=ok, status=status, warning=status in _WARNING_STATUSES,
                       error=None if ok else (
                           "no C-STORE response" if status is None
                           else f"C-STORE status 0x{status:04X}"))
    except TransferError as exc:
        for item, _ in loaded:
            if item.transfer_id not in recorded:
                record(item, ok=False, status=None, error=str(exc))


def send_due(db: Database, store: FileStore, config: NodeConfig, *,
             now: datetime | None = None, policy: RetryPolicy | None = None) -> SendReport:
    """Send every due transfer, one association per destination; returns what happened.

    Never raises for a peer's failure: each is recorded on its Transfer rows
    and in the audit log, and the next destination is tried regardless.
    """
    now = now or utcnow()
    policy = policy or RetryPolicy.from_config(config.send)
    report = SendReport()
    for dest_id, items in _due(db, now).items():
        with db.session() as s:
            dest = s.get(Destination, dest_id)
            if dest is None:
                continue
            s.expunge(dest)
        try:
            if dest.kind == "dicomweb":
                _send_dicomweb(db, store, dest, items, now, policy, report)
                continue
            peer = peer_for(dest, config)
            _send_destination(db, store, dest, peer, items, now, policy, report)
        except Exception:  # one destination's bug must not stop the others
            log.exception("sending to destination failed", extra={"destination": dest.name})
    return report

"""Append-only audit trail: who did what to which object, and how it ended."""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

from sqlalchemy.orm import Session

from storage.models import AuditEvent

__all__ = ["audit", "os_actor"]


def os_actor() -> str:
    """The OS user running this process, as the actor of CLI changes."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def audit(
    session: Session,
    event: str,
    *,
    outcome: str = "success",
    actor: str | None = None,
    host: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    job_id: int | None = None,
    **details: Any,
) -> AuditEvent:
    """Add an audit row to ``session`` (committed with the caller's transaction).

    Recording the event in the same transaction as the change it describes
    means there is never a change without its audit row, nor the reverse.
    """
    row = AuditEvent(
        event=event,
        outcome=outcome,
        actor=actor,
        host=host,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        job_id=job_id,
        details=details,
    )
    session.add(row)
    return row

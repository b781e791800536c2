"""The Destination table: peers from the config file plus those added on the command line.

Why a table and not just the config: a Transfer row points at its
destination, so a destination must have a stable id while transfers to it
are pending, even if an admin edits the config meanwhile. Config-defined rows
are upserted at start-up; one that leaves the config is disabled, not
deleted, so its transfer history stays.

Why a Protocol for the destination fields and a ``kinds`` parameter: storage
is the ground floor and knows neither the config file's classes nor which
result kinds the writers produce; the node passes both in.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import audit
from storage.errors import ConflictError, InputError
from storage.models import Destination

__all__ = [
    "DestinationFields",
    "add",
    "by_name",
    "list_all",
    "remove",
    "sync_from_config",
    "validate_accepts",
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DestinationFields(Protocol):
    """What a destination row is made of (the node's DestinationConfig has these fields)."""

    @property
    def name(self) -> str: ...
    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def accepts(self) -> Sequence[str]: ...
    @property
    def calling_ae_title(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...
    @property
    def type(self) -> str: ...
    @property
    def url(self) -> str | None: ...


def by_name(session: Session, name: str) -> Destination | None:
    return session.scalars(select(Destination).where(Destination.name == name)).one_or_none()


def list_all(session: Session) -> list[Destination]:
    return list(session.scalars(select(Destination).order_by(Destination.name)))


def _row_values(cfg: DestinationFields) -> dict[str, Any]:
    return {
        "ae_title": cfg.ae_title,
        "host": cfg.host,
        "port": cfg.port,
        "accepts": list(cfg.accepts),
        "calling_ae_title": cfg.calling_ae_title,
        "tls": cfg.tls,
        "kind": getattr(cfg, "type", "dicom"),
        "url": getattr(cfg, "url", None),
    }


def sync_from_config(session: Session, destinations: Sequence[DestinationFields],
                     *, actor: str | None = None) -> list[Destination]:
    """Upsert the config's destinations; disable config rows the config no longer names."""
    names = {d.name for d in destinations}
    rows = []
    for cfg in destinations:
        row = by_name(session, cfg.name)
        values = _row_values(cfg)
        if row is None:
            row = Destination(name=cfg.name, source="config", enabled=True, **values)
            session.add(row)
            audit(session, "destination.added", actor=actor, destination=cfg.name,
                  origin="config")
        else:
            changed = {k: v for k, v in values.items() if getattr(row, k) != v}
            if changed or not row.enabled or row.source != "config":
                for k, v in values.items():
                    setattr(row, k, v)
                row.enabled = True
                row.source = "config"
                audit(session, "destination.updated", actor=actor, destination=cfg.name,
                      fields=sorted(changed))
        rows.append(row)
    for row in list_all(session):
        if row.source == "config" and row.name not in names and row.enabled:
            row.enabled = False
            audit(session, "destination.disabled", actor=actor, destination=row.name,
                  reason="no longer in the config file")
    session.flush()
    return rows


def validate_accepts(accepts: Sequence[str], *, kinds: Collection[str]) -> list[str]:
    """``accepts`` normalised (upper case, no repeats); InputError unless all are ``kinds``."""
    wanted = [k.strip().upper() for k in accepts if k.strip()]
    bad = sorted(set(wanted) - set(kinds))
    if bad or not wanted:
        raise InputError(f"accepts must list some of {', '.join(kinds)}; got {accepts!r}")
    return list(dict.fromkeys(wanted))


def add(session: Session, config: DestinationFields, *, actor: str | None = None
        ) -> Destination:
    """Add a CLI-defined destination; ConflictError if the name is taken."""
    if by_name(session, config.name) is not None:
        raise ConflictError(f"destination {config.name!r} already exists")
    row = Destination(name=config.name, source="cli", enabled=True, **_row_values(config))
    session.add(row)
    audit(session, "destination.added", actor=actor, destination=config.name, origin="cli",
          ae_title=config.ae_title, host=config.host, port=config.port)
    session.flush()
    return row


def remove(session: Session, name: str, *, actor: str | None = None) -> None:
    """Remove a CLI-defined destination (and its transfer rows).

    A config-defined one is refused: it would come back at the next start.
    """
    row = by_name(session, name)
    if row is None:
        raise InputError(f"no destination named {name!r}")
    if row.source == "config":
        raise InputError(f"destination {name!r} is defined in the config file; remove it there")
    session.delete(row)
    audit(session, "destination.removed", actor=actor, destination=name)

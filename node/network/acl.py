"""Who may associate: calling AE titles, optionally tied to source hosts.

Checked when the A-ASSOCIATE-RQ arrives, before any presentation context is
negotiated, so an unknown peer never gets to send a byte of a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.config import CallerConfig

__all__ = ["AccessPolicy"]


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """An empty caller list admits everyone (the config documents and the node logs it)."""

    callers: tuple[CallerConfig, ...] = ()

    @classmethod
    def from_config(cls, callers: Sequence[CallerConfig]) -> AccessPolicy:
        return cls(tuple(callers))

    @property
    def open(self) -> bool:
        return not self.callers

    def refusal(self, calling_ae: str, host: str | None) -> str | None:
        """Why this caller is refused, or None when it is admitted."""
        if self.open:
            return None
        ae = calling_ae.strip()
        known = [c for c in self.callers if c.ae_title == ae]
        if not known:
            return "calling AE title not recognised"
        if any(not c.hosts or (host is not None and host in c.hosts) for c in known):
            return None
        return "calling host not allowed for this AE title"

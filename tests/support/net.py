"""Free loopback ports and bounded waiting: no test waits forever."""

from __future__ import annotations

from node.pacs import free_port, wait_for

__all__ = ["free_port", "wait_for"]

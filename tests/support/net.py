"""Free loopback ports and bounded waiting: no test waits forever.

The demo needs both as well (node.pacs), so they are defined there once.
"""

from __future__ import annotations

from node.pacs import free_port, wait_for

__all__ = ["free_port", "wait_for"]

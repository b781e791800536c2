"""Real DICOM peers for tests and benchmarks: dcmtk tools and an Orthanc PACS on loopback.

Both are programs nobody here wrote; the node is tested against them, not
against itself. The Orthanc launcher lives in node.pacs because `ainode demo`
runs it too; what only the tests need is here.
"""

from __future__ import annotations

from node import pacs
from node.pacs import Orthanc, dcmtk_env, find_tool
from tests.support.markers import peer_entry
from tests.support.net import wait_for

__all__ = ["Orthanc", "dcmtk_env", "orthanc", "orthanc_binary", "require", "wait_instances"]


orthanc = peer_entry("Orthanc")(pacs.orthanc)


@peer_entry("a DICOM peer program")
def require(tool: str) -> str:
    """Path of a peer program; fails (not skips) when missing: `make test` installs them."""
    path = find_tool(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed; `make test` installs dcmtk, orthanc and dicom3tools "
            "with apt-get when run as root"
        )
    return path


@peer_entry("Orthanc")
def orthanc_binary() -> str:
    return require("Orthanc")


@peer_entry("Orthanc")
def wait_instances(server: Orthanc, count: int, timeout: float = 60) -> list[str]:
    """Bounded wait until Orthanc holds at least ``count`` instances."""

    def enough() -> list[str]:
        ids = server.instances()
        return ids if len(ids) >= count else []

    return wait_for(enough, timeout=timeout, what=f"{count} instances in Orthanc")

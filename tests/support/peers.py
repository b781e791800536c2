"""Real DICOM peers for tests and benchmarks: dcmtk tools and an Orthanc PACS on loopback.

Both are programs nobody here wrote; the node is tested against them, not
against itself. The Orthanc launcher lives in node.pacs because `ainode demo`
uses it too.
"""

from __future__ import annotations

from node.pacs import Orthanc, dcmtk_env, find_tool, orthanc, wait_instances

__all__ = ["Orthanc", "dcmtk_env", "orthanc", "orthanc_binary", "require", "wait_instances"]


def require(tool: str) -> str:
    """Path of a peer program; fails (not skips) when missing: `make test` installs them."""
    path = find_tool(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed; `make test` installs dcmtk, orthanc and dicom3tools "
            "with apt-get when run as root"
        )
    return path


def orthanc_binary() -> str:
    return require("Orthanc")

"""Real DICOM peers for tests and benchmarks: dcmtk tools and an Orthanc PACS on loopback.

Both are programs nobody here wrote; the node is tested against them, not
against itself. The Orthanc launcher lives in node.pacs because `ainode demo`
runs it too; what only the tests need is here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from node import pacs
from node.pacs import Orthanc, dcmtk_env, find_tool
from tests.support.markers import peer_entry
from tests.support.net import free_port, wait_for
from tests.support.services import port_open

__all__ = ["Orthanc", "dcmtk_env", "orthanc", "orthanc_binary", "require", "store_scp",
           "wait_instances"]


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


@contextmanager
@peer_entry("dcmtk storescp")
def store_scp(folder: Path, aet: str) -> Iterator[int]:
    """dcmtk ``storescp`` as a destination PACS writing what it receives into ``folder``;
    yields its port once it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([require("storescp"), "-aet", aet, "-od", str(folder), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), timeout=30, what="storescp to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)

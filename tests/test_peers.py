"""The real peers the suite relies on are installed and start on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.peers import dcmtk_env, orthanc, require


def test_tools_are_installed() -> None:
    for tool in ("storescu", "storescp", "echoscu", "dciodvfy", "Orthanc"):
        require(tool)


def test_orthanc_starts_and_answers_echo(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        assert pacs.get("/system")["DicomAet"] == "ORTHANC"
        proc = subprocess.run(
            [require("echoscu"), "-aec", "ORTHANC", "127.0.0.1", str(pacs.dicom_port)],
            env=dcmtk_env(), capture_output=True, timeout=30,
        )
        assert proc.returncode == 0, proc.stderr

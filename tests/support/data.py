"""The shared real scanner data (../shared/data), used in place and never copied into git."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHARED_DATA", "dicom_series_dir", "list_series_dirs"]

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
DICOM = SHARED_DATA / "dicom"


def dicom_series_dir(name: str) -> Path:
    """Folder of one shared series; fails loudly if the shared data is missing."""
    path = DICOM / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared test data {path} is missing: the project expects ../shared/data beside "
            "the checkout (see the README)"
        )
    return path


def list_series_dirs() -> list[Path]:
    return sorted(p for p in DICOM.iterdir() if p.is_dir())

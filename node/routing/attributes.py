"""The attribute view a rule is evaluated against: keyword -> plain Python value.

Why a plain mapping: the same rule is evaluated on the ``Series.attributes``
JSON the receiver stored, on a header read from the spool when a rule asks for
a keyword the receiver did not keep, and on a folder of files for
``ainode rules test --path``; all three become the same dict of str, float,
int and lists of those.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.routing.conditions import CALLING_AE
from storage.errors import InputError
from storage.ingest.header import header_attributes, read_file_header

__all__ = ["attributes_from_dataset", "series_attributes", "series_in_folder"]

log = logging.getLogger(__name__)


def attributes_from_dataset(ds: Dataset, keywords: Collection[str] = ()) -> dict[str, Any]:
    """The routable attributes of ``ds``: ingest's keyword list plus ``keywords``.

    The list and the conversion are the receiver's (``storage.ingest.header``),
    so a header read here gives the values ingest stores with a series.
    ``CallingAE`` is the routing pseudo-keyword, never in a header.
    """
    return header_attributes(ds, [kw for kw in keywords if kw != CALLING_AE])


def series_attributes(
    stored: Mapping[str, Any],
    *,
    calling_ae: str | None,
    columns: Mapping[str, Any],
    needed: Collection[str] = (),
    header_path: Path | None = None,
) -> dict[str, Any]:
    """Merge what the receiver stored with a header read for keywords it did not keep."""
    attrs: dict[str, Any] = {k: v for k, v in columns.items() if v not in (None, "")}
    attrs.update(stored)
    if calling_ae:
        attrs[CALLING_AE] = calling_ae
    missing = [k for k in needed if k not in attrs and k != CALLING_AE]
    if missing and header_path is not None:
        try:
            attrs = {**attributes_from_dataset(read_file_header(header_path), missing),
                     **attrs}
        except InputError as exc:
            log.warning("cannot read a header for routing: %s", exc)
    return attrs


def series_in_folder(folder: Path) -> dict[str, list[Path]]:
    """Group the DICOM files under ``folder`` by SeriesInstanceUID (headers only)."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    groups: dict[str, list[Path]] = {}
    files: Iterable[Path] = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "") or "(no SeriesInstanceUID)"
        groups.setdefault(uid, []).append(path)
    if not groups:
        raise InputError(f"no DICOM files found under {folder}")
    return groups

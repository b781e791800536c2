"""The receiver's header: UIDs, identity and routing attributes of one Part 10 byte string.

Why it stands alone: routing reads the same keywords from a folder of files
(``ainode rules test --path``) and from a header in the spool, and both must
see what ingest stored with the series, so the keyword list and the one
conversion to routable values live here and routing uses them.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from storage.dicom_values import json_value
from storage.errors import InputError
from storage.filestore import valid_uid
from storage.ingest.pixels import check_native_pixel_length
from storage.part10 import file_meta as part10_scan_meta
from storage.part10 import scan as part10_scan

__all__ = [
    "ROUTING_KEYWORDS",
    "InstanceHeader",
    "header_attributes",
    "read_checked_header",
    "read_file_header",
    "read_header",
    "routing_attributes",
]


# Attributes copied into Series.attributes for routing rules, and read from a
# file's header by ``ainode rules test --path``: the same list, so a rule that
# matches live traffic matches its test. Deliberately no patient identity: this
# JSON is shown by the CLI and read by rule code. Every keyword must be in
# ``storage.part10``'s table, or the receive path's fast scan gives up.
ROUTING_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "ContrastBolusAgent",
    "SliceThickness",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "ScanningSequence",
    "MRAcquisitionType",
    "ConvolutionKernel",
    "KVP",
    "Rows",
    "Columns",
    "SeriesNumber",
    "PatientPosition",
    "PixelSpacing",
    "PhotometricInterpretation",
    "SequenceName",
    "MagneticFieldStrength",
    "StationName",
)
_IDENTITY_KEYWORDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDate")
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# The image geometry, for the native Pixel Data length check (storage.ingest.pixels).
_GEOMETRY_KEYWORDS = ("SamplesPerPixel", "BitsAllocated", "NumberOfFrames")
_HEADER_TAGS = list(dict.fromkeys(
    _UID_KEYWORDS + ROUTING_KEYWORDS + _IDENTITY_KEYWORDS + ("InstanceNumber",)
    + _GEOMETRY_KEYWORDS
))


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few attributes the receiver reads; the rest of the dataset stays as received."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    instance_number: int | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    attributes: dict[str, Any] = field(default_factory=dict)


def _text(values: dict[str, Any], keyword: str, limit: int) -> str | None:
    value = values.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(values: dict[str, Any], keyword: str) -> int | None:
    value = values.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# The most a Deflated Explicit VR data set may inflate to at the receiver. pydicom
# inflates the whole stream in memory before reading one element, so a few MB of
# deflated zeros (a "deflate bomb") would otherwise cost the process gigabytes.
MAX_INFLATED = 64 << 20
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _check_inflated_size(part10: bytes) -> None:
    """Refuse a deflated data set that inflates past MAX_INFLATED, inflating in bounded
    steps (never more than MAX_INFLATED held at once)."""
    meta = part10_scan_meta(part10)
    if meta is None or meta[0] != _DEFLATED:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = memoryview(part10)[meta[1]:]
    total = 0
    try:
        while data:
            out = inflater.decompress(data, 1 << 20)
            total += len(out)
            if total > MAX_INFLATED:
                raise InputError(f"deflated data set inflates past {MAX_INFLATED >> 20} MB")
            data = memoryview(inflater.unconsumed_tail)
            if not out and not data:
                break
    except zlib.error as exc:
        raise InputError(f"deflated data set is not a valid deflate stream: {exc}") from exc


def _pydicom_values(part10: bytes) -> dict[str, Any]:
    _check_inflated_size(part10)
    try:
        ds = pydicom.dcmread(
            BytesIO(part10), stop_before_pixels=True, specific_tags=_HEADER_TAGS
        )
        return {k: ds.get(k) for k in _HEADER_TAGS}
    except Exception as exc:
        # Whatever pydicom raises on hostile bytes (the fuzz harness found RecursionError
        # for deeply nested sequences, which answered 0xC211 unaudited) is the sender's
        # data set that cannot be understood, never the node's internal error.
        raise InputError(f"unparseable dataset: {type(exc).__name__}: {exc}"[:300]) from exc


def read_header(part10: bytes) -> InstanceHeader:
    """Parse only the UIDs and routing attributes of a Part 10 byte string.

    The plain case goes through ``storage.part10.scan`` (a fraction of the
    CPU, on the thread the sender waits on); whatever it is unsure of is read
    by pydicom. Raises InputError naming what is wrong; never returns a
    header whose UIDs could not serve as spool path components.
    """
    return _header(_values(part10))


def read_checked_header(part10: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """``read_header``, and refuse native Pixel Data whose length disagrees with the
    geometry (InputError): what the receiver reads before it writes anything."""
    values = _values(part10)
    header = _header(values)
    check_native_pixel_length(part10, transfer_syntax_uid, values)
    return header


def _values(part10: bytes) -> dict[str, Any]:
    values = part10_scan(part10, _HEADER_TAGS)
    return values if values is not None else _pydicom_values(part10)


def _header(values: dict[str, Any]) -> InstanceHeader:
    uids: dict[str, str] = {}
    missing = []
    for keyword in _UID_KEYWORDS:
        raw = values.get(keyword)
        uid = str(raw).strip() if raw is not None else ""
        if not uid:
            missing.append(keyword)
        elif not valid_uid(uid):
            raise InputError(f"invalid {keyword} {uid!r}")
        uids[keyword] = uid
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        instance_number=_int(values, "InstanceNumber"),
        modality=_text(values, "Modality", 16),
        series_number=_int(values, "SeriesNumber"),
        series_description=_text(values, "SeriesDescription", 64),
        body_part=_text(values, "BodyPartExamined", 16),
        patient_id=_text(values, "PatientID", 64),
        patient_name=_text(values, "PatientName", 324),
        accession_number=_text(values, "AccessionNumber", 16),
        study_date=_text(values, "StudyDate", 8),
        study_description=_text(values, "StudyDescription", 64),
        attributes=routing_attributes(values),
    )


def routing_attributes(
    values: Mapping[str, Any], keywords: Iterable[str] = ROUTING_KEYWORDS
) -> dict[str, Any]:
    """``keywords``' values as routable JSON; empty, binary and malformed ones are left out.

    The one conversion for the receiver's header and for a file's (see
    ``header_attributes``): a malformed optional attribute must not
    refuse the image, and an empty one is absent to a rule either way.
    """
    out: dict[str, Any] = {}
    for keyword in keywords:
        value = values.get(keyword)
        if value is None or value == "":
            continue
        try:
            converted = json_value(value)
        except (TypeError, ValueError):
            continue
        if converted is not None:
            out[keyword] = converted
    return out


def header_attributes(ds: Dataset, keywords: Collection[str] = ()) -> dict[str, Any]:
    """The routable attributes of a pydicom dataset: ``ROUTING_KEYWORDS`` plus ``keywords``.

    Why the extra keywords: a rule may ask for one the receiver did not keep,
    which is then read from a header in the spool or in a folder. Sequences
    are not routable values and are left out.
    """
    wanted = tuple(dict.fromkeys((*ROUTING_KEYWORDS, *keywords)))
    values: dict[str, Any] = {}
    for keyword in wanted:
        elem = ds.data_element(keyword) if keyword in ds else None
        if elem is not None and elem.VR != "SQ":
            values[keyword] = elem.value
    return routing_attributes(values, wanted)


def read_file_header(path: Path) -> Dataset:
    """The header of a DICOM file (pixels not read); InputError when it is not one."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"cannot read DICOM header of {path}: {exc}") from exc

"""Native pixel data whose length disagrees with its image geometry: refused on receipt.

Why at the receiver: an uncompressed slice cut short in transit (or by a
broken sender) was acknowledged with 0x0000 before this check; the job then
failed on "pixel data cannot be decoded" and the sender believed it had
delivered. The check reads the geometry the header scan already has and the
Pixel Data element's header (``storage.part10.pixel_data_length``; pydicom
with deferred values where that is unsure), never the pixels, so it adds
microseconds to the sender's wait.

Expected bytes (PS3.5 8.1.1): Rows x Columns x Samples per Pixel x Number of
Frames x Bits Allocated / 8, rounded up to a whole byte, plus one pad byte
when odd. Encapsulated (compressed) and deflated syntaxes are not checked
here: their length says nothing without decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO
from typing import Any

import pydicom

from storage.errors import InputError
from storage.part10 import pixel_data_length

__all__ = ["GEOMETRY_KEYWORDS", "check_native_pixel_length", "expected_native_length"]

# Syntaxes whose Pixel Data is native (uncompressed); deflated is left out.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_UNDEFINED = 0xFFFFFFFF
GEOMETRY_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")


def _int(values: Mapping[str, Any], keyword: str) -> int | None:
    value = values.get(keyword)
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def expected_native_length(values: Mapping[str, Any]) -> int | None:
    """Bytes native Pixel Data must have (even), or None without Rows/Columns/Bits Allocated."""
    rows, cols, bits = _int(values, "Rows"), _int(values, "Columns"), _int(values, "BitsAllocated")
    if rows is None or cols is None or bits is None:
        return None
    samples = _int(values, "SamplesPerPixel") or 1
    frames = _int(values, "NumberOfFrames") or 1
    n = (rows * cols * samples * frames * bits + 7) // 8
    return n + n % 2


def _pydicom_length(part10: bytes) -> int | None:
    """The Pixel Data length (what arrived of it) through pydicom, values left unread."""
    try:
        ds = pydicom.dcmread(BytesIO(part10), defer_size=256)
        if 0x7FE00010 not in ds:
            return None
        raw = ds.get_item(0x7FE00010)
    except Exception as exc:  # hostile bytes: the sender's, never an internal error
        raise InputError(f"unparseable dataset: {exc}") from exc
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None:  # a DataElement already read
        value = getattr(raw, "value", None)
        return len(value) if value is not None else 0
    if tell is not None and length != _UNDEFINED:
        return min(int(length), len(part10) - int(tell))
    return int(length)


def check_native_pixel_length(part10: bytes, transfer_syntax_uid: str,
                              values: Mapping[str, Any]) -> None:
    """Raise InputError when native Pixel Data is shorter or longer than its geometry.

    ``values``: the header's Rows, Columns, Samples per Pixel, Bits Allocated
    and Number of Frames (as ``storage.ingest.header`` read them).
    """
    if transfer_syntax_uid.strip("\0 ") not in _NATIVE:
        return
    expected = expected_native_length(values)
    sure, length = pixel_data_length(part10, expected)
    if not sure:
        length = _pydicom_length(part10)
    if length is None:
        return  # no Pixel Data (SR, KOS, presentation states)
    if length == _UNDEFINED:
        raise InputError("native Pixel Data with undefined length")
    if expected is None:
        raise InputError("Pixel Data without Rows, Columns or Bits Allocated")
    if length != expected:
        raise InputError(f"native Pixel Data is {length} bytes, its geometry needs {expected}")

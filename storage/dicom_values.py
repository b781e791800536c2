"""DICOM element values as JSON, the one conversion used wherever attributes are kept.

Why one function: ingest stores a series' routing attributes with it, and
routing reads headers from a folder (``ainode rules test --path``) with it; if
the two disagreed, a rule could match live traffic and fail its test, or the
reverse.
"""

from __future__ import annotations

from typing import Any

from pydicom.multival import MultiValue

__all__ = ["json_value"]


def json_value(value: Any) -> Any:
    """Numbers stay numbers (IS is an int, DS a float), lists stay lists, binary is dropped."""
    if isinstance(value, MultiValue | list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return None  # binary values are neither routable nor readable
    return str(value)  # PersonName, DSdecimal, dates...

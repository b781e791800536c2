"""Tables for people, JSON for scripts: every listing goes through here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["emit", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # enums
        return value.value
    return value


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool,
         title: str | None = None) -> None:
    """Print ``rows`` as a rich table, or as a JSON list when ``as_json``."""
    if as_json:
        print(json.dumps([to_jsonable(r) for r in rows], indent=2, sort_keys=True))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        cells = ("" if row.get(c) is None else str(to_jsonable(row.get(c))) for c in columns)
        table.add_row(*cells)
    Console(width=200).print(table)

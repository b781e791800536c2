"""Tables for people, JSON for scripts: every listing goes through here.

Why tables fit the terminal: a 200-column table wraps into an unreadable
mess on an 80- or 100-column console. Long UIDs are shortened in the middle
(their ends tell series apart) and the caption says so. Piped into another
program (no terminal, no ``COLUMNS``) a table is as wide as it takes. ``--wide`` prints
every column and every UID in full, one line per row, to copy into
``ainode render`` or ``reprocess``. ``--json`` is never shortened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["emit", "is_wide", "shorten_uid", "to_jsonable"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")
_UID_KEEP = 10  # characters kept at each end of a shortened UID


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


def shorten_uid(text: str) -> str:
    """``1.2.826.0.1…0.19.1234567`` for a long UID; anything else unchanged."""
    if len(text) <= 2 * _UID_KEEP + 1 or not _UID.match(text):
        return text
    return f"{text[:_UID_KEEP]}…{text[-_UID_KEEP:]}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    value = to_jsonable(value)
    if isinstance(value, datetime | str) and re.match(r"^\d{4}-\d\d-\d\dT", str(value)):
        return str(value)[:19].replace("T", " ")  # seconds are enough to read; --json has all
    return str(value)


def is_wide() -> bool:
    """Whether ``--wide`` was given to the running command (node.cli adds the option)."""
    # typer carries its own copy of click: its context stack, not click's.
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    obj = None if ctx is None else ctx.find_root().obj
    return bool(getattr(obj, "wide", False))


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool,
         title: str | None = None, wide_columns: Sequence[str] | None = None) -> None:
    """Print ``rows`` as a rich table, or as a JSON list when ``as_json``.

    ``wide_columns``: the fuller column set ``--wide`` shows (default: ``columns``).
    """
    if as_json:
        print(json.dumps([to_jsonable(r) for r in rows], indent=2, sort_keys=True))
        return
    wide = is_wide()
    cols = list(wide_columns or columns) if wide else list(columns)
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    shortened = False
    if not wide:
        short = [[shorten_uid(v) for v in row] for row in cells]
        shortened = short != cells
        cells = short
    console = Console()
    # No terminal to fit (a pipe, a file) and no COLUMNS asked for: one line per row,
    # as wide as it takes, so `ainode ... | grep` finds whole values.
    unfitted = not console.is_terminal and "COLUMNS" not in os.environ
    if wide or unfitted:
        need = sum(max([len(c), *(len(row[i]) for row in cells)]) + 3 for i, c in enumerate(cols))
        console = Console(width=max(console.width, need + 1))
        wide = True
    caption = "UIDs shortened; --wide shows them in full" if shortened else None
    table = Table(title=title, caption=caption)
    for col in cols:  # values fold within their columns, so the table keeps to the width
        table.add_column(col, overflow="fold", no_wrap=wide)
    for row in cells:
        table.add_row(*row)
    console.print(table)

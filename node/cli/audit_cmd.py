"""``ainode audit``: export the trail (JSON lines, CSV, DICOM audit messages) and verify
its hash chain.

The audit table is where identities live (calling AE, OS user, host); this is
the one command that prints them, to a file or stdout the admin chose.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from xml.etree import ElementTree as ET

import typer
from sqlalchemy import select

from node.audit_atna import audit_message, schema, validate
from node.cli.context import get
from node.cli.output import to_jsonable
from storage.audit_chain import seal, verify
from storage.errors import InputError
from storage.models import AuditEvent, utcnow

__all__ = ["app", "parse_since"]

app = typer.Typer(help="Audit trail (who did what, to which object, how it ended).",
                  no_args_is_help=True)

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FIELDS = ("id", "ts", "event", "outcome", "actor", "host", "study_uid", "series_uid",
          "sop_instance_uid", "job_id", "details")


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` ago, or an ISO date/time (UTC when no zone)."""
    now = now or utcnow()
    m = _AGO.match(text)
    if m:
        return now - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"cannot read time {text!r}: use e.g. 7d, 12h, 30m or "
                         "2024-05-01T08:00") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _rows(ctx: typer.Context, since: datetime, until: datetime | None,
          event: str | None, *, raw: bool = False) -> Iterator[dict[str, Any]]:
    q = select(AuditEvent).where(AuditEvent.ts >= since)
    if until is not None:
        q = q.where(AuditEvent.ts < until)
    if event:
        q = q.where(AuditEvent.event.like(event.replace("*", "%")))
    with get(ctx).db.session() as s:
        for row in s.scalars(q.order_by(AuditEvent.ts, AuditEvent.id)):
            yield {f: getattr(row, f) if raw else to_jsonable(getattr(row, f)) for f in FIELDS}


@app.command("export")
def export(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", help="e.g. 7d, 24h, or an ISO time")] = "1d",
    until: Annotated[str | None, typer.Option("--until", help="end (exclusive)")] = None,
    fmt: Annotated[Literal["jsonl", "csv", "dicom"], typer.Option(
        "--format", help="jsonl, csv, or dicom (PS3.15 A.5 audit messages, one XML per line)",
    )] = "jsonl",
    event: Annotated[str | None, typer.Option("--event", help="event name, * wildcards")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: stdout")] = None,
    check: Annotated[bool, typer.Option(
        "--validate", help="with --format dicom: check each message against the PS3.15 A.5.1 "
        "schema; exit 1 naming every audit id whose message does not validate (needs lxml)",
    )] = False,
) -> None:
    """Export audit events since --since, oldest first."""
    start = parse_since(since)
    end = parse_since(until) if until else None
    if check and fmt != "dicom":
        raise InputError("--validate checks DICOM audit messages: use it with --format dicom")
    if check:
        try:
            schema()  # lxml and the schema load before anything is written
        except ImportError as exc:
            raise InputError(str(exc)) from None
    invalid: list[tuple[Any, list[str]]] = []
    fh = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        count = 0
        if fmt == "csv":
            writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
            writer.writeheader()
        source_id = get(ctx).config.dicom.ae_title
        for row in _rows(ctx, start, end, event, raw=fmt == "dicom"):
            if fmt == "dicom":
                xml = ET.tostring(audit_message(row, source_id=source_id), encoding="unicode")
                if check and (errors := validate(xml)):
                    invalid.append((row["id"], errors))
                fh.write(xml + "\n")
            elif fmt == "csv":
                writer.writerow({**row, "details": json.dumps(row["details"], sort_keys=True)})
            else:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    finally:
        if output:
            fh.close()
    if output:
        typer.echo(f"{count} audit events written to {output}", err=True)
    for audit_id, errors in invalid:
        for error in errors:
            typer.echo(f"audit id {audit_id}: not a valid PS3.15 A.5.1 message: {error}",
                       err=True)
    if check:
        typer.echo(f"{count - len(invalid)} of {count} messages valid (PS3.15 A.5.1)", err=True)
    if invalid:
        raise typer.Exit(1)


@app.command("verify")
def verify_cmd(ctx: typer.Context) -> None:
    """Walk the audit hash chain and name every edited, deleted or inserted row.

    Exit 0 when the chain holds, 1 when a row breaks it (one line per row).
    """
    cfg = get(ctx).config.audit
    with get(ctx).db.session() as s:
        report = verify(s, key=cfg.key())
    for p in report.problems:
        typer.echo(f"{p.kind}: {p.message}")
    summary = (f"{report.sealed} rows on the chain, {report.pending} waiting to be sealed, "
               f"{report.checkpoints} checkpoints")
    if report.ok:
        typer.echo(f"audit chain intact: {summary}")
        return
    typer.echo(f"audit chain BROKEN ({len(report.problems)} problems): {summary}", err=True)
    raise typer.Exit(1)


@app.command("seal")
def seal_cmd(ctx: typer.Context) -> None:
    """Seal the rows not yet on the chain now and write a checkpoint (the node does this
    by itself every few seconds; this is for a node that is stopped)."""
    cfg = get(ctx).config.audit
    with get(ctx).db.session() as s:
        done = seal(s, key=cfg.key(), checkpoint_every=cfg.checkpoint_every, checkpoint=True)
    typer.echo(f"{done.rows} rows sealed; chain head at {done.head_seq}")

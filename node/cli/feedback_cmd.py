"""``ainode feedback``: readers' verdicts on findings and reference diagnoses of series.

The same storage functions the API and the console call (storage.feedback),
each audited with the reader as actor. ``--reader`` defaults to the OS user
running the command; the console and the API take the logged-in user.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select

from node.cli.context import get
from node.cli.output import emit
from storage.audit import os_actor
from storage.errors import InputError
from storage.feedback import (
    VERDICTS,
    latest_references,
    latest_verdicts,
    record_reference,
    record_verdict,
    series_by_uid,
)
from storage.models import Finding, Job

__all__ = ["app"]

app = typer.Typer(help="Readers' feedback: verdicts on findings, reference diagnoses.",
                  no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
ReaderOpt = Annotated[str | None, typer.Option("--reader", help="who says so (default: the "
                                               "OS user)")]
CommentOpt = Annotated[str | None, typer.Option("--comment", help="free text, optional")]


@app.command("verdict")
def verdict(ctx: typer.Context, finding_id: int,
            value: Annotated[str, typer.Argument(help=" | ".join(VERDICTS))],
            comment: CommentOpt = None, reader: ReaderOpt = None) -> None:
    """Record a reader's verdict on finding FINDING_ID (ids: ``ainode feedback list``)."""
    with get(ctx).db.session() as s:
        row = record_verdict(s, finding_id, value, reader=reader or os_actor(),
                             comment=comment, source="cli")
        typer.echo(f"finding {finding_id}: {row.verdict} (recorded as verdict {row.id})")


@app.command("reference")
def reference(ctx: typer.Context, series_uid: str, diagnosis: str,
              positive: Annotated[bool | None, typer.Option(
                  "--positive/--negative", help="the disease looked for is present / absent "
                  "(default: negative only for 'normal', 'negative', 'benign', ...)")] = None,
              comment: CommentOpt = None, reader: ReaderOpt = None) -> None:
    """Record the reference diagnosis of SERIES_UID (pathology, follow-up)."""
    with get(ctx).db.session() as s:
        row = record_reference(s, series_uid, diagnosis, reader=reader or os_actor(),
                               positive=positive, comment=comment, source="feedback")
        typer.echo(f"series {series_uid}: reference {row.diagnosis!r} "
                   f"({'positive' if row.positive else 'negative'})")


@app.command("import")
def import_csv(ctx: typer.Context, path: Path, reader: ReaderOpt = None) -> None:
    """Reference diagnoses from a CSV with columns series_uid, diagnosis[, positive]."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from exc
    if not rows or not {"series_uid", "diagnosis"} <= set(rows[0]):
        raise InputError(f"{path}: needs the columns series_uid and diagnosis")
    who = reader or os_actor()
    with get(ctx).db.session() as s:
        for n, row in enumerate(rows, start=2):
            pos_text = (row.get("positive") or "").strip().lower()
            positive = None if not pos_text else pos_text in ("1", "true", "yes", "y")
            try:
                record_reference(s, row["series_uid"].strip(), row["diagnosis"], reader=who,
                                 positive=positive, source="csv")
            except InputError as exc:
                raise InputError(f"{path} line {n}: {exc}") from exc
    typer.echo(f"recorded {len(rows)} reference diagnoses from {path}")


@app.command("list")
def list_(ctx: typer.Context,
          series: Annotated[str | None, typer.Option("--series", help="only this series")] =
          None, as_json: JsonOpt = False) -> None:
    """Findings with their verdicts (and each series' reference), newest jobs first."""
    with get(ctx).db.session() as s:
        q = select(Finding).join(Job, Finding.job_id == Job.id).order_by(
            Job.id.desc(), Finding.id).limit(500)
        if series is not None:
            q = q.where(Job.series_id == series_by_uid(s, series).id)
        findings = list(s.scalars(q))
        verdicts = latest_verdicts(s, [f.id for f in findings])
        refs = latest_references(s, {f.job.series_id for f in findings})
        rows: list[dict[str, Any]] = []
        for f in findings:
            ref = refs.get(f.job.series_id)
            rows.append({"finding": f.id, "job": f.job_id, "shadow": f.job.shadow,
                         "series_uid": f.job.series.series_instance_uid, "kind": f.kind,
                         "label": f.label, "probability": f.probability,
                         "verdicts": ",".join(verdicts.get(f.id, [])) or "-",
                         "reference": ref.diagnosis if ref else "-"})
    emit(rows, ["finding", "job", "kind", "label", "probability", "verdicts", "reference"],
         as_json=as_json, title="findings and feedback",
         wide_columns=["finding", "job", "shadow", "series_uid", "kind", "label",
                       "probability", "verdicts", "reference"])

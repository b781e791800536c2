"""``ainode studies list`` / ``ainode series list``: what arrived, with counts and state.

Patient identities are deliberately not shown: these tables end up in
tickets and chat; the audit table is where identities are looked up.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from node.cli.context import get
from node.cli.output import emit
from storage.models import SeriesState
from storage.series import list_series, list_studies

__all__ = ["series_app", "studies_app"]

studies_app = typer.Typer(help="Studies received.", no_args_is_help=True)
series_app = typer.Typer(help="Series received and their assembly state.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="at most this many rows")]


@studies_app.command("list")
def studies_list(ctx: typer.Context, as_json: JsonOpt = False, limit: LimitOpt = None) -> None:
    """List studies with their series and instance counts."""
    rows = [asdict(s) for s in list_studies(get(ctx).db, limit=limit)]
    emit(rows, ["id", "study_uid", "study_date", "series_count", "instance_count",
                "last_received_at"],
         as_json=as_json, title="studies",
         wide_columns=["id", "study_uid", "study_date", "description", "series_count",
                       "complete_series", "instance_count", "last_received_at"])


@series_app.command("list")
def series_list(
    ctx: typer.Context,
    study: Annotated[
        str | None, typer.Option("--study", help="only this Study Instance UID")
    ] = None,
    state: Annotated[SeriesState | None, typer.Option("--state", help="only this state")] = None,
    as_json: JsonOpt = False,
    limit: LimitOpt = None,
) -> None:
    """List series with instance counts and state (receiving, complete, routed)."""
    rows = [asdict(s) for s in list_series(get(ctx).db, study_uid=study, state=state, limit=limit)]
    # What fits 80 columns; --wide adds the study, description, reopen count, completion.
    emit(rows, ["id", "series_uid", "modality", "instance_count", "state", "last_received_at"],
         as_json=as_json, title="series",
         wide_columns=["id", "series_uid", "study_uid", "modality", "description",
                       "instance_count", "state", "reopened_count", "last_received_at",
                       "completed_at"])

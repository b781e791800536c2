"""Series assembly: when a series counts as complete, and study-level grouping.

DICOM has no "end of series" message, so a series is complete when no new
instance has arrived for the stable age. The completion is one guarded UPDATE
(``state = receiving AND last_received_at <= cutoff``): an instance committed
in between moves ``last_received_at`` and the guard keeps the series open, so
completion never races a late arrival. An instance arriving after completion
reopens the series (storage.ingest does that in its own transaction), and the
next completion hands routing the whole series again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from storage.audit import audit
from storage.db import Database
from storage.errors import StorageError
from storage.models import Series, SeriesState, Study

__all__ = [
    "CompletedSeries",
    "SeriesSummary",
    "StudySummary",
    "close_stable_series",
    "list_series",
    "list_studies",
    "series_of_study",
]

log = logging.getLogger(__name__)

_DONE_STATES = (SeriesState.COMPLETE, SeriesState.ROUTED)


@dataclass(frozen=True, slots=True)
class CompletedSeries:
    id: int
    series_uid: str
    study_uid: str
    instance_count: int
    reopened_count: int


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    id: int
    series_uid: str
    study_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    state: str
    instance_count: int
    size_bytes: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    reopened_count: int
    calling_ae: str | None


@dataclass(frozen=True, slots=True)
class StudySummary:
    id: int
    study_uid: str
    study_date: str | None
    description: str | None
    series_count: int
    instance_count: int
    complete_series: int
    first_received_at: datetime
    last_received_at: datetime


def close_stable_series(db: Database, stable_age_s: float, now: datetime) -> list[CompletedSeries]:
    """Mark complete every receiving series idle for ``stable_age_s``; return those newly done."""
    cutoff = now - timedelta(seconds=stable_age_s)
    done: list[CompletedSeries] = []
    try:
        with db.session() as s:
            candidates = s.execute(
                select(Series.id).where(
                    Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff,
                    # A series whose only rows were undone (a failed write, the start-up
                    # check) has nothing to route; it waits for its instances.
                    Series.instance_count > 0,
                )
            ).scalars().all()
            for series_id in candidates:
                row = s.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.state == SeriesState.RECEIVING,
                           Series.last_received_at <= cutoff, Series.instance_count > 0)
                    .values(state=SeriesState.COMPLETE, completed_at=now)
                    .returning(Series.series_instance_uid, Series.instance_count,
                               Series.reopened_count, Series.study_id)
                ).first()
                if row is None:
                    continue  # an instance arrived in between: still receiving
                uid, count, reopened, study_id = row
                study_uid = s.execute(
                    select(Study.study_instance_uid).where(Study.id == study_id)
                ).scalar_one()
                audit(s, "series.completed", actor="scheduler", study_uid=study_uid,
                      series_uid=uid, instance_count=count, reopened_count=reopened,
                      stable_age_s=stable_age_s)
                done.append(CompletedSeries(series_id, uid, study_uid, count, reopened))
    except SQLAlchemyError as exc:
        raise StorageError(f"series completion failed: {exc}") from exc
    for c in done:
        log.info("series complete", extra={"series_uid": c.series_uid,
                                           "instance_count": c.instance_count})
    return done


def _summary(series: Series, study_uid: str) -> SeriesSummary:
    return SeriesSummary(
        id=series.id, series_uid=series.series_instance_uid, study_uid=study_uid,
        modality=series.modality, series_number=series.series_number,
        description=series.series_description, state=SeriesState(series.state).value,
        instance_count=series.instance_count, size_bytes=series.size_bytes,
        first_received_at=series.first_received_at, last_received_at=series.last_received_at,
        completed_at=series.completed_at, reopened_count=series.reopened_count,
        calling_ae=series.calling_ae,
    )


def series_of_study(db: Database, study_uid: str) -> list[SeriesSummary]:
    """All series of one study, in arrival order: what a study-level pipeline asks for."""
    return list_series(db, study_uid=study_uid)


def list_series(
    db: Database, *, study_uid: str | None = None, state: SeriesState | None = None,
    limit: int | None = None,
) -> list[SeriesSummary]:
    query = select(Series, Study.study_instance_uid).join(Study, Series.study_id == Study.id)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if state is not None:
        query = query.where(Series.state == state)
    query = query.order_by(Series.first_received_at, Series.id)
    if limit is not None:
        query = query.limit(limit)
    with db.session() as s:
        return [_summary(series, uid) for series, uid in s.execute(query).all()]


def list_studies(db: Database, *, limit: int | None = None) -> list[StudySummary]:
    complete = func.sum(case((Series.state.in_(_DONE_STATES), 1), else_=0))
    query = (
        select(Study, func.count(Series.id), func.coalesce(func.sum(Series.instance_count), 0),
               complete)
        .outerjoin(Series, Series.study_id == Study.id)
        .group_by(Study.id)
        .order_by(Study.first_received_at, Study.id)
    )
    if limit is not None:
        query = query.limit(limit)
    with db.session() as s:
        return [
            StudySummary(
                id=st.id, study_uid=st.study_instance_uid, study_date=st.study_date,
                description=st.study_description, series_count=int(n_series),
                instance_count=int(n_inst or 0), complete_series=int(n_complete or 0),
                first_received_at=st.first_received_at, last_received_at=st.last_received_at,
            )
            for st, n_series, n_inst, n_complete in s.execute(query).all()
        ]

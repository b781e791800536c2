"""Versioned routing rules: every change adds a version and keeps the old one.

Why it lives in routing rather than in storage: it is routing's logic (rule
specs, their conditions and validation) over storage's ``RoutingRule`` table,
and storage imports nothing above it.

Why versions rather than updates in place: a job records the rule version that
created it (``Job.rule_key = "<name>@v<version>"``), so a result can always be
traced to the exact conditions and pipeline in force, and an edit is an
auditable event (who, what changed) rather than a silent overwrite. A removed
rule is one whose versions are all non-current; adding the name again
continues its version numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.routing.conditions import Condition
from node.routing.rules import RuleSpec
from storage.audit import audit
from storage.errors import ConflictError, InputError
from storage.models import Destination, RoutingRule

__all__ = [
    "ImportSummary",
    "add_rule",
    "current_rules",
    "get_rule",
    "history",
    "import_rules",
    "known_destinations",
    "remove_rule",
    "rule_key",
    "spec_of",
    "update_rule",
    "validate_spec",
]

log = logging.getLogger(__name__)


def rule_key(row: RoutingRule) -> str:
    return f"{row.name}@v{row.version}"


def spec_of(row: RoutingRule) -> RuleSpec:
    """The stored row as a RuleSpec (conditions re-validated on the way in)."""
    return RuleSpec(
        name=row.name,
        pipeline=row.pipeline,
        conditions=tuple(Condition.from_dict(c) for c in row.conditions),
        destinations=tuple(str(d) for d in row.destinations),
        priority=row.priority,
        enabled=row.enabled,
        shadow=row.shadow,
        stable_age_s=row.stable_age_s,
        models=row.models,
    )


def known_destinations(session: Session, configured: Collection[str] = ()) -> set[str]:
    """Destination names a rule may use: the table (CLI-added) plus the config file's."""
    names = set(session.scalars(select(Destination.name).where(Destination.enabled)))
    return names | set(configured)


def current_rules(session: Session, *, enabled_only: bool = False) -> list[RoutingRule]:
    """Current versions, most urgent first (higher priority first, then by name)."""
    q = select(RoutingRule).where(RoutingRule.is_current)
    if enabled_only:
        q = q.where(RoutingRule.enabled)
    return list(session.scalars(q.order_by(RoutingRule.priority.desc(), RoutingRule.name)))


def get_rule(session: Session, name: str, version: int | None = None) -> RoutingRule:
    """The current version of ``name`` (or that version); InputError when there is none."""
    q = select(RoutingRule).where(RoutingRule.name == name)
    q = q.where(RoutingRule.version == version) if version is not None else q.where(
        RoutingRule.is_current)
    row = session.scalars(q).first()
    if row is None:
        what = f"version {version} of rule" if version is not None else "rule"
        raise InputError(f"no {what} {name!r}")
    return row


def history(session: Session, name: str) -> list[RoutingRule]:
    rows = list(session.scalars(
        select(RoutingRule).where(RoutingRule.name == name).order_by(RoutingRule.version)))
    if not rows:
        raise InputError(f"no rule {name!r}")
    return rows


def _insert_version(session: Session, spec: RuleSpec, version: int, actor: str) -> RoutingRule:
    row = RoutingRule(
        name=spec.name,
        version=version,
        is_current=True,
        enabled=spec.enabled,
        priority=spec.priority,
        conditions=[c.to_dict() for c in spec.conditions],
        pipeline=spec.pipeline,
        destinations=list(spec.destinations),
        stable_age_s=spec.stable_age_s,
        shadow=spec.shadow,
        models=spec.models,
        created_by=actor[:64],
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError as exc:
        # Two admins saving the same rule at once: the second is told, not merged.
        raise ConflictError(
            f"rule {spec.name!r} version {version} was saved concurrently; try again") from exc
    return row


def _validate(session: Session, spec: RuleSpec, pipelines: Collection[str],
              configured_destinations: Collection[str]) -> None:
    spec.validate(pipelines=pipelines,
                  destinations=known_destinations(session, configured_destinations))


def validate_spec(session: Session, spec: RuleSpec, pipelines: Collection[str],
                  configured_destinations: Collection[str] = ()) -> None:
    """The checks add_rule makes, on their own (the CLI checks intent after them)."""
    _validate(session, spec, pipelines, configured_destinations)


def add_rule(
    session: Session,
    spec: RuleSpec,
    *,
    actor: str,
    pipelines: Collection[str],
    configured_destinations: Collection[str] = (),
) -> RoutingRule:
    """Create a rule (version 1, or the next number when the name was removed before)."""
    _validate(session, spec, pipelines, configured_destinations)
    existing = session.scalars(
        select(RoutingRule).where(RoutingRule.name == spec.name, RoutingRule.is_current)).first()
    if existing is not None:
        raise InputError(f"rule {spec.name!r} already exists (version {existing.version}); "
                         "use 'ainode rules edit'")
    last = session.scalar(select(func.max(RoutingRule.version)).where(
        RoutingRule.name == spec.name)) or 0
    row = _insert_version(session, spec, last + 1, actor)
    audit(session, "rule.created", actor=actor, rule=spec.name, version=row.version,
          definition=spec.to_dict())
    log.info("rule created", extra={"rule": spec.name, "version": row.version})
    return row


def _diff(old: RuleSpec, new: RuleSpec) -> dict[str, list[Any]]:
    a, b = old.to_dict(), new.to_dict()
    return {k: [a[k], b[k]] for k in a if a[k] != b[k]}


def update_rule(
    session: Session,
    name: str,
    *,
    actor: str,
    pipelines: Collection[str],
    configured_destinations: Collection[str] = (),
    **changes: Any,
) -> RoutingRule:
    """Save a new version with ``changes`` (RuleSpec fields); a no-op change adds nothing."""
    current = get_rule(session, name)
    old = spec_of(current)
    if "name" in changes and changes["name"] != name:
        raise InputError("a rule cannot be renamed; add a new rule and remove this one")
    new = old.with_changes(**changes)
    diff = _diff(old, new)
    if not diff:
        return current
    _validate(session, new, pipelines, configured_destinations)
    current.is_current = False
    session.flush()
    row = _insert_version(session, new, current.version + 1, actor)
    audit(session, "rule.changed", actor=actor, rule=name, version=row.version,
          previous_version=current.version, changes=diff)
    log.info("rule changed", extra={"rule": name, "version": row.version})
    return row


def remove_rule(session: Session, name: str, *, actor: str) -> RoutingRule:
    """Retire the rule: its versions stay (jobs refer to them), none is current."""
    current = get_rule(session, name)
    current.is_current = False
    audit(session, "rule.removed", actor=actor, rule=name, version=current.version)
    log.info("rule removed", extra={"rule": name, "version": current.version})
    return current


@dataclass(frozen=True, slots=True)
class ImportSummary:
    created: list[str]
    changed: list[str]
    unchanged: list[str]
    removed: list[str]


def import_rules(
    session: Session,
    specs: Sequence[RuleSpec],
    *,
    actor: str,
    pipelines: Collection[str],
    configured_destinations: Collection[str] = (),
    prune: bool = False,
) -> ImportSummary:
    """Make the stored rules match ``specs`` (all or nothing: one bad rule refuses the file).

    ``prune`` also removes current rules the file does not name, so a YAML file
    kept in git can be the single source of truth.
    """
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"rule name(s) repeated in the import: {', '.join(dupes)}")
    dests = known_destinations(session, configured_destinations)
    for spec in specs:  # validate everything before changing anything
        spec.validate(pipelines=pipelines, destinations=dests)
    current = {r.name: r for r in current_rules(session)}
    created: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    for spec in specs:
        row = current.get(spec.name)
        if row is None:
            add_rule(session, spec, actor=actor, pipelines=pipelines,
                     configured_destinations=configured_destinations)
            created.append(spec.name)
        elif spec_of(row) == spec:
            unchanged.append(spec.name)
        else:
            fields = {k: getattr(spec, k) for k in spec.__slots__ if k != "name"}
            update_rule(session, spec.name, actor=actor, pipelines=pipelines,
                        configured_destinations=configured_destinations, **fields)
            changed.append(spec.name)
    removed: list[str] = []
    if prune:
        for name in sorted(set(current) - set(names)):
            remove_rule(session, name, actor=actor)
            removed.append(name)
    return ImportSummary(created, changed, unchanged, removed)

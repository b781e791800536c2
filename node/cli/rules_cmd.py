"""``ainode rules``: routing rules as reviewed data — add, edit, test, replay, import, export.

Every change goes through node.routing.store, so it is validated (unknown keyword,
bad regex, unknown pipeline or destination: exit code 2), versioned, and
audited with the OS user who ran the command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from node.cli.audit_cmd import parse_since
from node.cli.context import AppContext, get
from node.cli.output import emit
from node.config import yaml_problem
from node.orchestration import (
    decisive_attributes,
    evaluate_series,
    not_an_image_series,
    skip_decision,
)
from node.routing import (
    CALLING_AE,
    RuleSpec,
    attributes_from_dataset,
    evaluate_rule,
    opts_in,
    parse_condition,
    referenced_keys,
    series_in_folder,
)
from node.routing import store as rule_store
from pipelines import registry
from storage.audit import os_actor
from storage.errors import InputError
from storage.image_kind import NotAnImage
from storage.ingest.header import read_file_header
from storage.models import Job, RoutingRule, Series

__all__ = ["app"]

log = logging.getLogger(__name__)

app = typer.Typer(help="Routing rules: which series go to which pipeline, results to whom.",
                  no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table")]
COLUMNS = ("name", "version", "enabled", "priority", "when", "pipeline", "send_to",
           "stable_age_s", "shadow")


def _pipelines() -> list[str]:
    try:
        return registry.available()
    except Exception as exc:  # a pipeline module failing to import must not block admin work
        log.warning("pipeline registry unavailable", extra={"error": str(exc)})
        return []


def _configured(app_ctx: AppContext) -> list[str]:
    return [d.name for d in app_ctx.config.destinations]


def _row(rule: RoutingRule, *, for_table: bool) -> dict[str, Any]:
    spec = rule_store.spec_of(rule).to_dict()
    row = {**spec, "version": rule.version, "created_at": rule.created_at,
           "created_by": rule.created_by, "current": rule.is_current}
    if for_table:
        row["when"] = " & ".join(spec["when"]) or "(always)"
        row["send_to"] = ", ".join(spec["send_to"])
    return row


def _emit_rule(rule: RoutingRule, as_json: bool) -> None:
    emit([_row(rule, for_table=not as_json)], COLUMNS, as_json=as_json,
         wide_columns=(*COLUMNS, "created_by", "created_at"))


@app.command("add")
def add(
    ctx: typer.Context,
    name: str,
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="registered pipeline name")],
    when: Annotated[list[str] | None, typer.Option(
        "--when", "-w", help="condition, e.g. 'Modality=CT' (repeat: all must hold)")] = None,
    send_to: Annotated[list[str] | None, typer.Option(
        "--send-to", "-d", help="destination name(s), repeat or comma-separate")] = None,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    stable_age: Annotated[float | None, typer.Option(
        "--stable-age", help="seconds of quiet before this rule routes a series")] = None,
    shadow: Annotated[bool, typer.Option(
        "--shadow", help="run and record results, send nothing")] = False,
    disabled: Annotated[bool, typer.Option("--disabled", help="add it switched off")] = False,
    catch_all: Annotated[bool, typer.Option(
        "--catch-all", help="no --when on purpose: the rule routes every series")] = False,
    no_send: Annotated[bool, typer.Option(
        "--no-send", help="no --send-to on purpose: results stay on the node")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a rule (version 1).

    A rule without a condition routes every series the node receives, so it
    needs ``--catch-all``; one without a destination keeps its results on the
    node and says so unless ``--no-send`` (or ``--shadow``) says it is meant.
    """
    app_ctx = get(ctx)
    spec = RuleSpec.build(name, pipeline=pipeline, when=when or [], send_to=send_to or [],
                          priority=priority, enabled=not disabled, shadow=shadow,
                          stable_age_s=stable_age)
    if no_send and spec.destinations:
        raise InputError("--no-send and --send-to contradict each other")
    with app_ctx.db.session() as s:
        # The store's own checks first (unknown pipeline, destination...), so the
        # first message names the first mistake; then the intent, before anything is saved.
        rule_store.validate_spec(s, spec, _pipelines(), _configured(app_ctx))
        check_intent(spec, catch_all=catch_all, no_send=no_send)
        row = rule_store.add_rule(s, spec, actor=os_actor(), pipelines=_pipelines(),
                                  configured_destinations=_configured(app_ctx))
        _emit_rule(row, as_json)


def check_intent(spec: RuleSpec, *, catch_all: bool, no_send: bool) -> None:
    """Refuse an accidental catch-all; warn about a rule whose results go nowhere."""
    if not spec.conditions and not catch_all:
        raise InputError(
            f"rule {spec.name!r} has no --when condition, so it would route every series "
            "this node receives; add a condition, or pass --catch-all if that is meant")
    if not spec.destinations and not spec.shadow and not no_send:
        typer.echo(f"ainode: warning: rule {spec.name!r} sends its results nowhere (no "
                   "--send-to); they stay on the node. Pass --no-send to say that is meant.",
                   err=True)


@app.command("list")
def list_rules(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include removed rules' last versions")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """List the current rules, most urgent first."""
    with get(ctx).db.session() as s:
        rows = rule_store.current_rules(s)
        if all_:
            names = {r.name for r in rows}
            removed = [rule_store.history(s, n)[-1] for n in sorted(set(s.scalars(
                select(RoutingRule.name))) - names)]
            rows += removed
        emit([_row(r, for_table=not as_json) for r in rows], (*COLUMNS, "current")
             if all_ else COLUMNS, as_json=as_json, title="routing rules")


@app.command("show")
def show(
    ctx: typer.Context,
    name: str,
    version: Annotated[int | None, typer.Option(help="a past version")] = None,
    history: Annotated[bool, typer.Option("--history", help="every version")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a rule (or one of its versions, or all of them)."""
    with get(ctx).db.session() as s:
        rows = rule_store.history(s, name) if history else [
            rule_store.get_rule(s, name, version)]
        emit([_row(r, for_table=not as_json) for r in rows],
             (*COLUMNS, "current", "created_by", "created_at"), as_json=as_json)


@app.command("edit")
def edit(
    ctx: typer.Context,
    name: str,
    when: Annotated[list[str] | None, typer.Option(
        "--when", "-w", help="replace all conditions with these")] = None,
    add_when: Annotated[list[str] | None, typer.Option("--add-when", help="add a condition")]
    = None,
    drop_when: Annotated[list[str] | None, typer.Option(
        "--drop-when", help="remove a condition (as listed)")] = None,
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    send_to: Annotated[list[str] | None, typer.Option(
        "--send-to", "-d", help="replace the destinations")] = None,
    no_send: Annotated[bool, typer.Option("--no-send", help="remove all destinations")] = False,
    priority: Annotated[int | None, typer.Option()] = None,
    stable_age: Annotated[float | None, typer.Option("--stable-age")] = None,
    default_stable_age: Annotated[bool, typer.Option(
        "--default-stable-age", help="use the node's stable age again")] = False,
    shadow: Annotated[bool | None, typer.Option("--shadow/--live")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a rule: saves a new version and keeps the old one."""
    app_ctx = get(ctx)
    changes: dict[str, Any] = {}
    with app_ctx.db.session() as s:
        current = rule_store.spec_of(rule_store.get_rule(s, name))
        conds = list(current.conditions)
        if when is not None:
            conds = [parse_condition(w) for w in when]
        for text in drop_when or []:
            target = parse_condition(text)
            if target not in conds:
                raise InputError(f"rule {name!r} has no condition {text!r}; it has: "
                                 + ", ".join(c.to_text() for c in conds))
            conds.remove(target)
        conds += [parse_condition(w) for w in add_when or []]
        if conds != list(current.conditions):
            changes["conditions"] = tuple(conds)
        if pipeline is not None:
            changes["pipeline"] = pipeline
        if no_send:
            changes["destinations"] = ()
        elif send_to is not None:
            changes["destinations"] = tuple(
                p.strip() for v in send_to for p in v.split(",") if p.strip())
        if priority is not None:
            changes["priority"] = priority
        if default_stable_age:
            changes["stable_age_s"] = None
        elif stable_age is not None:
            changes["stable_age_s"] = stable_age
        if shadow is not None:
            changes["shadow"] = shadow
        if not changes:
            raise InputError("nothing to change; see ainode rules edit --help")
        row = rule_store.update_rule(s, name, actor=os_actor(), pipelines=_pipelines(),
                                     configured_destinations=_configured(app_ctx), **changes)
        _emit_rule(row, as_json)


def _toggle(ctx: typer.Context, name: str, enabled: bool, as_json: bool) -> None:
    app_ctx = get(ctx)
    with app_ctx.db.session() as s:
        row = rule_store.update_rule(s, name, actor=os_actor(), pipelines=_pipelines(),
                                     configured_destinations=_configured(app_ctx),
                                     enabled=enabled)
        _emit_rule(row, as_json)


@app.command("enable")
def enable(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Switch a rule on (a new version)."""
    _toggle(ctx, name, True, as_json)


@app.command("disable")
def disable(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Switch a rule off (a new version); its past jobs and versions stay."""
    _toggle(ctx, name, False, as_json)


@app.command("remove")
def remove(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Retire a rule; its versions stay for the audit trail and its jobs."""
    with get(ctx).db.session() as s:
        row = rule_store.remove_rule(s, name, actor=os_actor())
        emit([{"name": row.name, "version": row.version, "removed": True}],
             ("name", "version", "removed"), as_json=as_json)


def _read_specs(path: Path) -> list[RuleSpec]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {yaml_problem(exc)}") from exc
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of rules (or a mapping with key 'rules')")
    return [RuleSpec.from_dict(item) for item in data]


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Path,
    prune: Annotated[bool, typer.Option("--prune", help="remove rules the file does not name")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Make the rules match a YAML file (all or nothing)."""
    app_ctx = get(ctx)
    specs = _read_specs(path)
    with app_ctx.db.session() as s:
        summary = rule_store.import_rules(
            s, specs, actor=os_actor(), pipelines=_pipelines(),
            configured_destinations=_configured(app_ctx), prune=prune)
    rows = [{"rule": n, "action": a} for a, names in (
        ("created", summary.created), ("changed", summary.changed),
        ("unchanged", summary.unchanged), ("removed", summary.removed)) for n in names]
    emit(rows, ("rule", "action"), as_json=as_json)


@app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: stdout")]
    = None,
) -> None:
    """Write the current rules as YAML (the format `rules import` reads)."""
    with get(ctx).db.session() as s:
        data = {"rules": [rule_store.spec_of(r).to_dict() for r in rule_store.current_rules(s)]}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def _specs(ctx: typer.Context, rules_file: Path | None, only: str | None) -> list[RuleSpec]:
    if rules_file is not None:
        specs = _read_specs(rules_file)
    else:
        with get(ctx).db.session() as s:
            specs = [rule_store.spec_of(r) for r in rule_store.current_rules(s)]
    if only is not None:
        specs = [sp for sp in specs if sp.name == only]
        if not specs:
            raise InputError(f"no rule {only!r}")
    return specs


def _evaluation_rows(series_uid: str, specs: list[RuleSpec], evaluations: list[Any],
                     kind: NotAnImage | None, modality: str | None, *, as_json: bool
                     ) -> list[dict[str, Any]]:
    """One row per rule, as routing would act on it.

    ``kind`` says why the series is no image series (routing's own decision,
    None for an image series): a rule that matches it then routes nothing
    (SKIPPED, with the reason) unless it names what the series is on purpose.
    """
    decisive = None if kind is None else decisive_attributes(kind, modality)
    rows = []
    for spec, ev in zip(specs, evaluations, strict=True):
        d = ev.to_dict()
        skipped = bool(ev.matched and decisive is not None and not opts_in(spec, decisive))
        result = "MATCH" if d["matched"] else ("disabled" if not d["enabled"] else "no")
        why = d["explanation"]
        if kind is not None and ev.matched:
            named = ", ".join(f"{k} {v}" for k, v in (decisive or {}).items())
            if skipped:
                result = "SKIPPED"
                why = (f"matches, but routing skips the series: {kind.reason} (no job; a "
                       f"rule routes it only by naming {named})")
            else:
                why = f"{why}; routes this {kind.kind} on purpose (names {named})"
        if as_json:
            rows.append({"series": series_uid, **d, "routed": ev.matched and not skipped,
                         "skip_reason": kind.reason if skipped and kind else None,
                         "not_an_image": None if kind is None else kind.to_dict()})
        else:
            rows.append({"series": series_uid, "rule": d["rule"], "result": result, "why": why})
    if not evaluations:
        rows.append({"series": series_uid, "rule": None, "result": "no rules",
                     "why": "no rules defined", "matched": False})
    return rows


def _folder_kind(files: list[Path], first: dict[str, Any]) -> NotAnImage | None:
    """Routing's verdict on a folder's series: its first file, and for a localizer its last."""
    def later() -> dict[str, Any] | None:
        return attributes_from_dataset(read_file_header(files[-1])) if len(files) > 1 else None

    return skip_decision(first, later)


@app.command("test")
def test(
    ctx: typer.Context,
    series: Annotated[str | None, typer.Option("--series", help="a received series' UID")]
    = None,
    path: Annotated[Path | None, typer.Option("--path", help="a folder of DICOM files")] = None,
    calling_ae: Annotated[str | None, typer.Option(
        "--calling-ae", help="CallingAE to assume for --path")] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="only this rule")] = None,
    rules_file: Annotated[Path | None, typer.Option(
        "--rules", help="test a YAML rule set instead of the stored rules")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which rules match a series, and for those that do not, which condition failed.

    A series routing skips as no image to analyse (a localizer, a Secondary
    Capture, a derived or a colour image, a result object) shows SKIPPED and why
    for each rule it matches, rather than a pipeline it would never reach.
    """
    if (series is None) == (path is None):
        raise InputError("give exactly one of --series UID or --path DIR")
    app_ctx = get(ctx)
    specs = _specs(ctx, rules_file, rule)
    rows: list[dict[str, Any]] = []
    if series is not None:
        with app_ctx.db.session() as s:
            row = s.scalars(select(Series).where(Series.series_instance_uid == series)).first()
            if row is None:
                raise InputError(f"no received series {series}")
            store = app_ctx.filestore()
            rows += _evaluation_rows(series, specs, evaluate_series(s, row, specs, store),
                                     not_an_image_series(s, row, store), row.modality,
                                     as_json=as_json)
    else:
        assert path is not None
        needed = referenced_keys(specs)
        for uid, files in series_in_folder(path).items():
            attrs = attributes_from_dataset(read_file_header(files[0]), needed)
            kind = _folder_kind(files, dict(attrs))
            if calling_ae:
                attrs[CALLING_AE] = calling_ae
            rows += _evaluation_rows(uid, specs, [evaluate_rule(sp, attrs) for sp in specs],
                                     kind, attrs.get("Modality"), as_json=as_json)
    emit(rows, ("series", "rule", "result", "why"), as_json=as_json)


@app.command("replay")
def replay(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", help="e.g. 7d, 24h or an ISO time")] = "7d",
    rules_file: Annotated[Path | None, typer.Option(
        "--rules", help="replay a YAML rule set instead of the stored rules")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which stored series the rules would have routed, and to what; runs nothing."""
    app_ctx = get(ctx)
    start = parse_since(since)
    specs = [sp for sp in _specs(ctx, rules_file, None) if sp.enabled]
    store = app_ctx.filestore()
    out: list[dict[str, Any]] = []
    with app_ctx.db.session() as s:
        q = (select(Series).options(selectinload(Series.study))
             .where(Series.last_received_at >= start).order_by(Series.last_received_at))
        for row in s.scalars(q):
            evs = evaluate_series(s, row, specs, store)
            matched = [sp for sp, ev in zip(specs, evs, strict=True) if ev.matched]
            has_jobs = s.scalar(select(Job.id).where(Job.series_id == row.id).limit(1))
            out.append({
                "series": row.series_instance_uid, "modality": row.modality,
                "description": row.series_description, "state": row.state,
                "last_received_at": row.last_received_at,
                "would_route_to": [f"{sp.name} -> {sp.pipeline}" for sp in matched]
                if as_json else ", ".join(f"{sp.name} -> {sp.pipeline}" for sp in matched)
                or "(no rule)",
                "has_jobs": has_jobs is not None,
            })
    emit(out, ("series", "modality", "description", "state", "would_route_to", "has_jobs"),
         as_json=as_json, title=f"replay since {start.isoformat(timespec='seconds')}")

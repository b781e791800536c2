"""A routing rule as a value object: validated when saved, evaluated per completed series.

Why validation takes the known pipelines and destinations as arguments: the
rule module knows nothing of the registry or the database, so the same check
runs in the CLI, in YAML import and in tests, against whatever the caller
knows to exist (dependencies passed in, no globals).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from node.routing.conditions import Condition, ConditionResult, evaluate, parse_condition
from storage.errors import InputError

__all__ = [
    "RESERVED_PIPELINES",
    "RuleEvaluation",
    "RuleSpec",
    "evaluate_rule",
    "opts_in",
    "referenced_keys",
]

# The AI engineer registers these; they are accepted even before their module imports.
RESERVED_PIPELINES: frozenset[str] = frozenset({"pancreas-ct", "pancreas-mr"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """What an admin says about a rule; storage adds the version, author and time."""

    name: str
    pipeline: str
    conditions: tuple[Condition, ...] = ()
    destinations: tuple[str, ...] = ()
    priority: int = 0
    enabled: bool = True
    shadow: bool = False
    stable_age_s: float | None = None
    # A candidate model set (node.candidates) this rule's jobs run instead of the
    # active models; None: the active ones.
    models: str | None = None

    @classmethod
    def build(
        cls,
        name: str,
        *,
        pipeline: str,
        when: Iterable[str] = (),
        send_to: Iterable[str] = (),
        priority: int = 0,
        enabled: bool = True,
        shadow: bool = False,
        stable_age_s: float | None = None,
        models: str | None = None,
    ) -> RuleSpec:
        """Parse the grammar form (CLI and YAML); raises InputError on the first bad part."""
        spec = cls(
            name=name,
            pipeline=pipeline,
            conditions=tuple(parse_condition(c) for c in when),
            destinations=tuple(_split_names(send_to)),
            priority=priority,
            enabled=enabled,
            shadow=shadow,
            stable_age_s=stable_age_s,
            models=models or None,
        )
        spec.check_shape()
        return spec

    def check_shape(self) -> None:
        """Checks that need nothing from outside the rule."""
        if not _NAME.match(self.name):
            raise InputError(
                f"invalid rule name {self.name!r}: letters, digits, '.', '_' and '-', "
                "at most 64 characters, starting with a letter or digit"
            )
        if not self.pipeline:
            raise InputError(f"rule {self.name!r} needs a pipeline")
        if self.stable_age_s is not None and not 0 < self.stable_age_s <= 86400:
            raise InputError(f"rule {self.name!r}: stable age must be in (0, 86400] seconds")
        if not -1000 <= self.priority <= 1000:
            raise InputError(f"rule {self.name!r}: priority must be between -1000 and 1000")
        if len(set(self.destinations)) != len(self.destinations):
            raise InputError(f"rule {self.name!r} names a destination twice")
        if self.models is not None and not self.shadow:
            # A model set under trial has not been accepted: its results stay off PACS.
            raise InputError(f"rule {self.name!r} runs candidate models {self.models!r}; "
                             "such a rule must be a shadow rule")

    def validate(self, *, pipelines: Collection[str], destinations: Collection[str]) -> None:
        """Refuse a rule naming an unknown pipeline or destination (InputError, exit 2)."""
        self.check_shape()
        known = set(pipelines) | RESERVED_PIPELINES
        if self.pipeline not in known:
            raise InputError(
                f"unknown pipeline {self.pipeline!r} in rule {self.name!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        missing = [d for d in self.destinations if d not in destinations]
        if missing:
            known_dest = ", ".join(sorted(destinations)) or "(none; see ainode destinations add)"
            raise InputError(
                f"unknown destination {', '.join(map(repr, missing))} in rule {self.name!r}; "
                f"known: {known_dest}"
            )

    # -- data form ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form, with conditions in the grammar a person reads."""
        return {
            "name": self.name,
            "enabled": self.enabled,
            "priority": self.priority,
            "when": [c.to_text() for c in self.conditions],
            "pipeline": self.pipeline,
            "send_to": list(self.destinations),
            "stable_age_s": self.stable_age_s,
            "shadow": self.shadow,
            **({"models": self.models} if self.models else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuleSpec:
        """The inverse of :meth:`to_dict`; unknown keys are refused, naming them."""
        allowed = {"name", "enabled", "priority", "when", "pipeline", "send_to", "stable_age_s",
                   "shadow", "models"}
        if not isinstance(data, Mapping):
            raise InputError(f"a rule must be a mapping, got {type(data).__name__}")
        extra = sorted(set(data) - allowed)
        if extra:
            raise InputError(f"unknown key(s) {', '.join(extra)} in rule {data.get('name')!r}")
        for required in ("name", "pipeline"):
            if not data.get(required):
                raise InputError(f"rule {data.get('name')!r} has no {required!r}")
        when = data.get("when") or []
        send_to = data.get("send_to") or []
        when = [when] if isinstance(when, str) else when
        send_to = [send_to] if isinstance(send_to, str) else send_to
        if not isinstance(when, list) or not isinstance(send_to, list):
            raise InputError(f"rule {data['name']!r}: 'when' and 'send_to' must be lists")
        try:
            priority = int(data.get("priority") or 0)
            age = data.get("stable_age_s")
            stable_age_s = None if age is None else float(age)
        except (TypeError, ValueError) as exc:
            raise InputError(f"rule {data['name']!r}: {exc}") from exc
        return cls.build(
            str(data["name"]),
            pipeline=str(data["pipeline"]),
            when=[str(w) for w in when],
            send_to=[str(s) for s in send_to],
            priority=priority,
            enabled=bool(data.get("enabled", True)),
            shadow=bool(data.get("shadow", False)),
            stable_age_s=stable_age_s,
            models=str(data["models"]) if data.get("models") else None,
        )

    def with_changes(self, **changes: Any) -> RuleSpec:
        spec = replace(self, **changes)
        spec.check_shape()
        return spec


def _split_names(values: Iterable[str]) -> list[str]:
    # `--send-to pacs,archive` and `--send-to pacs --send-to archive` mean the same.
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


@dataclass(frozen=True, slots=True)
class RuleEvaluation:
    """How one rule fared against one series, condition by condition."""

    rule: str
    matched: bool
    enabled: bool
    results: tuple[ConditionResult, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> list[ConditionResult]:
        return [r for r in self.results if not r.matched]

    def explain(self) -> str:
        if not self.enabled:
            return "rule is disabled"
        if self.matched:
            return "all conditions matched" if self.results else "no conditions (matches all)"
        return "; ".join(f"{r.condition.to_text()}: {r.reason}" for r in self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "matched": self.matched,
            "enabled": self.enabled,
            "explanation": self.explain(),
            "conditions": [r.to_dict() for r in self.results],
        }


def evaluate_rule(spec: RuleSpec, attributes: Mapping[str, Any]) -> RuleEvaluation:
    """All conditions are evaluated (not short-circuited) so the explanation is complete.

    A disabled rule never matches, but its conditions are still reported, so
    ``ainode rules test`` shows whether enabling it would route the series.
    """
    results = tuple(evaluate(c, attributes) for c in spec.conditions)
    ok = all(r.matched for r in results)
    return RuleEvaluation(spec.name, ok and spec.enabled, spec.enabled, results)


# Operators that can name a value on purpose; "!=", "?" and "!" name none.
_NAMING_OPS = frozenset({"=", "in", "~"})


def opts_in(spec: RuleSpec, decisive: Mapping[str, Any]) -> bool:
    """True when the rule asks for a series that is no image by naming what makes it one.

    Routing skips localizers, Secondary Captures, derived, colour and result
    objects (``storage.image_kind``); ``decisive`` is the attribute and value
    that decided it (``{"ImageType": "LOCALIZER"}``, ``{"SOPClassUID":
    "1.2.840.10008.5.1.4.1.1.7"}``...). A rule opts in only with a condition on
    that keyword that matches that value by itself (``ImageType~LOCALIZER``,
    ``SOPClassUID=1.2.840.10008.5.1.4.1.1.7``, ``PhotometricInterpretation~YBR``),
    so a rule written for ordinary series (``Modality=CT``, ``ImageType=AXIAL``)
    never routes a screenshot or a scout by accident.
    """
    for cond in spec.conditions:
        if cond.key in decisive and cond.op in _NAMING_OPS \
                and evaluate(cond, {cond.key: decisive[cond.key]}).matched:
            return True
    return False


def referenced_keys(specs: Sequence[RuleSpec]) -> set[str]:
    """The keywords the rules look at (to read only those from a DICOM header)."""
    return {c.key for s in specs for c in s.conditions}

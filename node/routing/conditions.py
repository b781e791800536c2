"""The condition grammar of routing rules, compiled to data and evaluated without eval.

Grammar (one condition per ``--when``; scripts and tests rely on it)::

    KEY=V        equals; case-insensitive for text, numeric for numbers
    KEY=A|B|C    equals any of
    KEY!=V       not equal (an absent attribute is "not equal")
    KEY!=A|B|C   equals none of (the mirror of ``=A|B|C``)
    KEY~REGEX    case-insensitive regular-expression search
    KEY<N  KEY<=N  KEY>N  KEY>=N    numeric comparison (a range is two conditions)
    KEY?         present with a non-empty value
    !KEY         absent or empty

KEY is a DICOM keyword from pydicom's data dictionary, or ``CallingAE``.
Refused when saved, because each is a mistake that would otherwise route
silently wrong: ``KEY==V`` (a programmer's equality: it would compare with
"=V"), and ``<``/``>`` on a text attribute (``Modality<3`` is true of nothing).

Why data and not code: a rule is stored, exported to YAML, reviewed in git and
compiled again when loaded; an ``eval``-ed expression could do anything on the
node. Validation happens when a rule is saved, so a bad regex or an unknown
keyword is refused at the CLI, never discovered while routing a patient's series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydicom.datadict import dictionary_VR, keyword_dict

from storage.errors import InputError
from storage.suggest import did_you_mean

__all__ = [
    "CALLING_AE",
    "OPERATORS",
    "Condition",
    "ConditionResult",
    "Op",
    "evaluate",
    "parse_condition",
]

CALLING_AE = "CallingAE"
Op = Literal["=", "!=", "~", "<", "<=", ">", ">=", "in", "not_in", "present", "absent"]
OPERATORS: tuple[str, ...] = ("=", "!=", "~", "<", "<=", ">", ">=", "in", "not_in", "present",
                              "absent")
_NUMERIC: frozenset[str] = frozenset({"<", "<=", ">", ">="})
# Value representations that hold numbers (PS3.5 6.2); any other VR is text to a rule.
_NUMERIC_VRS: frozenset[str] = frozenset(
    {"DS", "IS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})

_SYNTAX = re.compile(
    r"""^\s*(?:
        !\s*(?P<absent>[A-Za-z][A-Za-z0-9]*)\s*
      | (?P<present>[A-Za-z][A-Za-z0-9]*)\s*\?\s*
      | (?P<key>[A-Za-z][A-Za-z0-9]*)\s*(?P<op><=|>=|!=|=|~|<|>)(?P<value>.*)
    )$""",
    re.VERBOSE | re.DOTALL,
)


def _check_key(key: str, text: str) -> None:
    if key != CALLING_AE and key not in keyword_dict:
        hint = did_you_mean(key, [*keyword_dict, CALLING_AE])
        raise InputError(
            f"unknown DICOM keyword {key!r} in condition {text!r}"
            + (f"; did you mean {hint}?" if hint else
               f" (use a keyword such as SeriesDescription, or {CALLING_AE})")
        )


def _vr(key: str) -> str:
    """The keyword's value representation ('US or SS' style entries kept whole)."""
    if key == CALLING_AE:
        return "AE"
    return str(dictionary_VR(keyword_dict[key]))


def _check_numeric(key: str, op: str, text: str) -> None:
    vr = _vr(key)
    if not any(part.strip() in _NUMERIC_VRS for part in vr.split(" or ")):
        raise InputError(
            f"condition {text!r}: {key} is a text attribute (VR {vr}), so {op} cannot compare "
            f"it with a number; use {key}=V, {key}=A|B or {key}~REGEX")


def _number(raw: str, text: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"condition {text!r} needs a number after the operator, got {raw!r}") \
            from None
    if not math.isfinite(value):
        raise InputError(f"condition {text!r} needs a finite number, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class Condition:
    """One compiled condition: keyword, operator and value, as stored in the database."""

    key: str
    op: Op
    value: str | float | tuple[str, ...] | None = None

    # -- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        value: Any = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"key": self.key, "op": self.op, "value": value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Condition:
        """Rebuild and re-validate a stored condition (a hand-edited row is checked too)."""
        try:
            key, op, value = str(data["key"]), str(data["op"]), data.get("value")
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed stored condition {data!r}") from exc
        if op not in OPERATORS:
            raise InputError(f"unknown operator {op!r} in stored condition {data!r}")
        cond = cls(key, op, tuple(str(v) for v in value) if isinstance(value, list) else value)  # type: ignore[arg-type]
        return parse_condition(cond.to_text())

    def to_text(self) -> str:
        """The grammar form; ``parse_condition(c.to_text()) == c`` for every condition."""
        if self.op == "present":
            return f"{self.key}?"
        if self.op == "absent":
            return f"!{self.key}"
        if self.op in ("in", "not_in"):
            assert isinstance(self.value, tuple)
            return f"{self.key}{'=' if self.op == 'in' else '!='}" + "|".join(self.value)
        value = self.value
        if isinstance(value, float):
            value = f"{value:g}" if value == int(value) else repr(value)
        return f"{self.key}{self.op}{value}"

    def __str__(self) -> str:
        return self.to_text()


def parse_condition(text: str) -> Condition:
    """Compile one condition, raising InputError (exit code 2 at the CLI) when it is refused."""
    m = _SYNTAX.match(text)
    if m is None:
        raise InputError(
            f"cannot parse condition {text!r}; expected KEY=V, KEY!=V, KEY~REGEX, KEY<N, "
            "KEY<=N, KEY>N, KEY>=N, KEY=A|B|C, KEY? or !KEY"
        )
    if m["absent"]:
        _check_key(m["absent"], text)
        return Condition(m["absent"], "absent")
    if m["present"]:
        _check_key(m["present"], text)
        return Condition(m["present"], "present")
    key, op, raw = m["key"], cast(Op, m["op"]), m["value"].strip()
    _check_key(key, text)
    if raw == "":
        raise InputError(f"condition {text!r} has no value (use !{key} for an absent attribute)")
    if op in ("=", "!=") and raw.startswith("="):
        raise InputError(
            f"condition {text!r}: '{op}=' is not an operator; write {key}{op}{raw[1:].strip()}")
    if op in _NUMERIC:
        _check_numeric(key, op, text)
        return Condition(key, op, _number(raw, text))
    if op == "~":
        try:
            re.compile(raw, re.IGNORECASE)
        except re.error as exc:
            raise InputError(f"bad regular expression in condition {text!r}: {exc}") from exc
        return Condition(key, "~", raw)
    if op in ("=", "!=") and "|" in raw:
        options = tuple(o.strip() for o in raw.split("|"))
        if any(o == "" for o in options):
            raise InputError(f"condition {text!r} has an empty alternative between '|'")
        return Condition(key, "in" if op == "=" else "not_in", options)
    return Condition(key, op, raw)


# -- evaluation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConditionResult:
    condition: Condition
    matched: bool
    actual: Any  # the value seen (None when absent)
    reason: str  # one line, for `ainode rules test`

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition.to_text(),
            "matched": self.matched,
            "actual": self.actual,
            "reason": self.reason,
        }


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, list | tuple):
        return all(_is_empty(v) for v in value)
    return False


def _as_text(value: Any) -> str:
    # Multi-valued attributes (ImageType) compare as DICOM writes them: V1\V2\V3.
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _equals(actual: Any, expected: str) -> bool:
    """Case-insensitive text equality, numeric when both sides are numbers.

    A multi-valued attribute equals V when its whole value (``A\\B``) or any
    one of its values does, so ``ImageType=AXIAL`` matches ``ORIGINAL\\PRIMARY\\AXIAL``.
    """
    candidates: list[Any] = [actual]
    if isinstance(actual, list | tuple):
        candidates.extend(actual)
    want_num = _as_number(expected)
    for cand in candidates:
        if isinstance(cand, list | tuple):
            text = _as_text(cand)
        else:
            num = _as_number(cand)
            if want_num is not None and num is not None and math.isclose(num, want_num):
                return True
            text = _as_text(cand)
        if text.casefold() == expected.casefold():
            return True
    return False


def evaluate(cond: Condition, attributes: Mapping[str, Any]) -> ConditionResult:
    """Evaluate against ``attributes`` (keyword -> value); says why when it does not match."""
    actual = attributes.get(cond.key)
    present = not _is_empty(actual)
    shown = actual if present else None
    if cond.op == "present":
        return ConditionResult(cond, present, shown, "present" if present else "absent or empty")
    if cond.op == "absent":
        return ConditionResult(cond, not present, shown,
                               "absent" if not present else f"present: {_as_text(actual)!r}")
    if not present:
        if cond.op in ("!=", "not_in"):
            return ConditionResult(cond, True, None, "absent, so not equal")
        return ConditionResult(cond, False, None, f"{cond.key} is absent or empty")
    if cond.op == "=":
        assert isinstance(cond.value, str)
        ok = _equals(actual, cond.value)
        return ConditionResult(cond, ok, shown, f"{_as_text(actual)!r} "
                               + ("equals" if ok else "does not equal") + f" {cond.value!r}")
    if cond.op == "!=":
        assert isinstance(cond.value, str)
        ok = not _equals(actual, cond.value)
        return ConditionResult(cond, ok, shown, f"{_as_text(actual)!r} "
                               + ("differs from" if ok else "equals") + f" {cond.value!r}")
    if cond.op == "in":
        assert isinstance(cond.value, tuple)
        ok = any(_equals(actual, v) for v in cond.value)
        return ConditionResult(cond, ok, shown, f"{_as_text(actual)!r} "
                               + ("is" if ok else "is not") + f" one of {list(cond.value)}")
    if cond.op == "not_in":
        assert isinstance(cond.value, tuple)
        ok = not any(_equals(actual, v) for v in cond.value)
        return ConditionResult(cond, ok, shown, f"{_as_text(actual)!r} "
                               + ("is none" if ok else "is one") + f" of {list(cond.value)}")
    if cond.op == "~":
        assert isinstance(cond.value, str)
        ok = re.search(cond.value, _as_text(actual), re.IGNORECASE) is not None
        return ConditionResult(cond, ok, shown, f"{_as_text(actual)!r} "
                               + ("matches" if ok else "does not match") + f" /{cond.value}/i")
    # numeric comparisons
    assert isinstance(cond.value, float)
    num = None if isinstance(actual, list | tuple) and len(actual) != 1 else _as_number(
        actual[0] if isinstance(actual, list | tuple) else actual)
    if num is None:
        return ConditionResult(cond, False, shown, f"{_as_text(actual)!r} is not a single number")
    ok = {
        "<": num < cond.value,
        "<=": num <= cond.value,
        ">": num > cond.value,
        ">=": num >= cond.value,
    }[cond.op]
    return ConditionResult(cond, ok, shown,
                           f"{num:g} {cond.op} {cond.value:g} is {'true' if ok else 'false'}")

"""Routing rules: which completed series go to which pipeline, and where results go.

``conditions`` holds the grammar (parsed to data, never eval-ed), ``rules``
the rule value object with its validation and explained evaluation,
``attributes`` the keyword -> value view a rule is evaluated against.
Storage of versioned rules is in ``store`` (over storage's RoutingRule table).
"""

from node.routing.attributes import attributes_from_dataset, series_attributes, series_in_folder
from node.routing.conditions import CALLING_AE, Condition, ConditionResult, parse_condition
from node.routing.rules import (
    RESERVED_PIPELINES,
    RuleEvaluation,
    RuleSpec,
    evaluate_rule,
    opts_in,
    referenced_keys,
)

__all__ = [
    "CALLING_AE",
    "RESERVED_PIPELINES",
    "Condition",
    "ConditionResult",
    "RuleEvaluation",
    "RuleSpec",
    "attributes_from_dataset",
    "evaluate_rule",
    "opts_in",
    "parse_condition",
    "referenced_keys",
    "series_attributes",
    "series_in_folder",
]

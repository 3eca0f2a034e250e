"""The rule library: one file per rule family (named after its forward rule), listed in `registry.py`."""

from xrlflow.rules.registry import CANONICAL_RULES, RULE_FINGERPRINT, RULES, default_engine, rule_names, select_rules

__all__ = ["CANONICAL_RULES", "RULES", "RULE_FINGERPRINT", "default_engine", "rule_names", "select_rules"]

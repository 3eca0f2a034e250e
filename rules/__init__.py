"""The rule library: one file per rule family (named after its forward rule), listed in `registry.py`."""

from xrlflow.rules.registry import RULE_FINGERPRINT, RULES, default_engine, rule_names, select_rules

__all__ = ["RULES", "RULE_FINGERPRINT", "default_engine", "rule_names", "select_rules"]

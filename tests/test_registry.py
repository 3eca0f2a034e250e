"""The registry's load-time check of `reverse` pairs."""

from __future__ import annotations

import pytest

from xrlflow.engine import Rule
from xrlflow.rules.registry import RULES, check_reverses


def make_rule(name: str, reverse: str | None) -> Rule:
    """A rule that only has a name and a reverse (it never matches)."""
    members = {"name": name, "reverse": reverse, "find": lambda self, graph: iter(()),
               "rewrite": lambda self, graph, nodes, params: graph}
    return type(name.title().replace("-", ""), (Rule,), members)()


def test_the_registry_pairs_every_reverse():
    check_reverses(RULES)
    assert sum(r.reverse is not None for r in RULES) >= 2


def test_a_reverse_that_is_not_registered_is_refused():
    with pytest.raises(ValueError, match="'split-x' is not registered"):
        check_reverses([make_rule("merge-x", "split-x")])


def test_a_reverse_that_does_not_point_back_is_refused():
    with pytest.raises(ValueError, match="names None as its reverse"):
        check_reverses([make_rule("merge-x", "split-x"), make_rule("split-x", None)])
    with pytest.raises(ValueError, match="names 'merge-y' as its reverse"):
        check_reverses([make_rule("merge-x", "split-x"), make_rule("split-x", "merge-y"), make_rule("merge-y", "split-x")])


def test_paired_and_unpaired_rules_pass():
    check_reverses([make_rule("merge-x", "split-x"), make_rule("split-x", "merge-x"), make_rule("fold-y", None)])

"""The rewrite engine: rules, matches and their application.

A `Rule` finds bindings in a graph (`find`) and rewrites one binding into a new graph (`rewrite`); rules know
nothing of RL or measurement. The engine lists every applicable match of a rule set in a stable order (the
registry's order, then the bound node names) and applies one, returning a new graph.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Sequence

from xrlflow.errors import GraphError
from xrlflow.ir import Graph


@dataclass(frozen=True, slots=True)
class Match:
    """One applicable rewrite: the rule, the nodes it binds (anchor first) and rule-specific parameters."""

    rule: str
    nodes: tuple[str, ...]
    params: tuple[Any, ...] = ()


class Rule(ABC):
    """A rewrite rule: a pattern with conditions (`find`) and a replacement (`rewrite`).

    `name` is stable kebab-case (checkpoints store it); `description` says what it does and why it can pay
    under onnxruntime (directly, or by enabling another rule); `reverse` names the rule that undoes it.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    reverse: ClassVar[str | None] = None

    @abstractmethod
    def find(self, graph: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        """Yield (bound node names, params) for every place the rule applies. Never yield a binding whose
        rewrite would create a cycle or change what the graph computes."""

    @abstractmethod
    def rewrite(self, graph: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        """Return the rewritten graph (through GraphEdit(graph, self.name)); `graph` stays unchanged."""

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


class RewriteEngine:
    """Matches and applies an ordered rule set. The order is the action layout: see `fingerprint`."""

    def __init__(self, rules: Sequence[Rule], allowed: Iterable[str] | None = None) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("duplicate rule names")
        self.rules = tuple(rules)
        self.rule_index = {r.name: i for i, r in enumerate(self.rules)}
        self._by_name = {r.name: r for r in self.rules}
        self.allowed = None if allowed is None else frozenset(allowed)
        self._memo_key = "matches:" + self.fingerprint

    def restricted(self, allowed: Iterable[str]) -> "RewriteEngine":
        """The same action layout (rule order and fingerprint: what a policy was trained on) offering only the
        allowed rules' matches."""
        return RewriteEngine(self.rules, allowed)

    @property
    def fingerprint(self) -> str:
        """Identifies the rule set and its order; a policy trained on one rule set refuses another."""
        text = "\n".join(r.name for r in self.rules)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def rule(self, name: str) -> Rule:
        return self._by_name[name]

    def matches(self, graph: Graph) -> list[Match]:
        """Every applicable match (of the allowed rules), in a deterministic order (memoised per graph value)."""
        memo = graph.memo()
        found = memo.get(self._memo_key)
        if found is None:
            found = memo[self._memo_key] = self._find_all(graph)
        return found if self.allowed is None else [m for m in found if m.rule in self.allowed]

    def _find_all(self, graph: Graph) -> list[Match]:
        found: list[Match] = []
        for rule in self.rules:
            seen: set[tuple[str, ...]] = set()
            bucket = []
            for nodes, params in rule.find(graph):
                key = (nodes, params)
                if key in seen:
                    continue
                seen.add(key)
                bucket.append(Match(rule.name, tuple(nodes), tuple(params)))
            bucket.sort(key=lambda m: (m.nodes, repr(m.params)))
            found.extend(bucket)
        return found

    def apply(self, graph: Graph, match: Match) -> Graph:
        rule = self._by_name.get(match.rule)
        if rule is None:
            raise GraphError(f"unknown rule {match.rule!r}")
        result = rule.rewrite(graph, match.nodes, match.params)
        result.topological_order()  # a cycle here is a bug in the rule's find(): fail loudly
        return result

    def canonicalize(self, graph: Graph, rule_names: Iterable[str]) -> tuple[Graph, list[Match]]:
        """Apply the given rules exhaustively (first match first) and return the result and what was applied.

        For normalisations onnxruntime performs anyway (e.g. folding BatchNorm into the Conv before it): doing
        them once up front costs nothing at run time and keeps them out of the search's action budget.
        """
        wanted = [n for n in rule_names if n in self._by_name]
        applied: list[Match] = []
        for _ in range(1000):
            pending = [m for m in self.matches(graph) if m.rule in wanted]
            if not pending:
                return graph, applied
            start = graph
            for m in pending:
                # Matches found on `start` stay valid while none of their nodes was touched since.
                if all(graph.nodes.get(n) is start.nodes[n] for n in m.nodes):
                    graph = self.apply(graph, m)
                    applied.append(m)
        raise GraphError("canonicalisation did not converge")

    def apply_sequence(self, graph: Graph, matches: Iterable[Match]) -> Graph:
        for m in matches:
            graph = self.apply(graph, m)
        return graph


def prepare_for_search(graph: Graph, engine: RewriteEngine, canonical_rules: Iterable[str]) -> Graph:
    """The graph a search starts from: canonical rules applied exhaustively, and the constants they created
    folded into initializers (so the search, the observation and the cost model see one Conv, not a Conv
    plus the dozen constant nodes that computed its folded weight)."""
    from xrlflow.onnx_io import load_graph, to_model

    canonical, applied = engine.canonicalize(graph, canonical_rules)
    if not applied:
        return graph
    shapes = {name: graph.static_shape(name) for name in graph.inputs}
    return load_graph(to_model(canonical, fold_constants=True), {k: v for k, v in shapes.items() if v is not None})

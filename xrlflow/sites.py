"""Structurally identical rewrite sites, their joint application, and a rewrite's predicted cost change.

The layers of a transformer (and the repeated cells of many CNNs) are identical, so a rule that applies in
one layer applies at the same place in all of them. `site_groups` groups the matches of a graph by the local
structure of what they bind: the rule, each bound node's op, domain and attributes, the type (dtype, shape)
and constness of every value it reads and writes, how the bound nodes feed each other, and how many readers
each output has. Within a group only matches with disjoint bound nodes are kept (first in engine order
wins), so a group is a set of places where the same rewrite can be done one after the other.
`apply_at_sites` does that, re-checking before each application that the match is still valid (a
neighbouring rewrite may have changed what a rule's conditions look at).

`local_cost_delta` predicts what a rewrite changes in a graph's latency without pricing the whole graph:
it prices only the nodes the rewrite removed and added plus the unchanged nodes within `radius` hops of
them, in the parent and in the child, and returns the difference. The unchanged nodes are the same in both
priced pieces, so what the cut at their border does to their kernels cancels; `radius` (5) reaches past the
largest pattern onnxruntime fuses in the cost model (GELU: 5 nodes), so a rewrite that breaks or enables a
fusion is priced with it (radius 4 already gave the whole-graph difference on every match of the zoo's
transformers; tests/test_env.py checks it on small graphs). This is for cheap latency services (the cost model): it calls
`service.latency` on two small graphs.

Core module: no torch, no gymnasium.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from xrlflow.engine import Match, RewriteEngine
from xrlflow.errors import GraphError
from xrlflow.ir import Graph
from xrlflow.latency import LatencyService

LOCAL_RADIUS = 5
GUARD_HOPS = 3  # how far from its bound nodes a rule's find() looks (inputs' producers, readers of readers)


def _value_key(graph: Graph, value: str) -> tuple[Any, ...]:
    t = graph.types.get(value)
    return (None if t is None else (t.dtype, t.shape), graph.is_constant(value))


def _params_key(graph: Graph, params: Any) -> Any:
    """The match's parameters without the names of values and nodes (they differ from site to site)."""
    if isinstance(params, (tuple, list)):
        return tuple(_params_key(graph, p) for p in params)
    if isinstance(params, str) and (params in graph.types or params in graph.nodes or params in graph.producer):
        return "<name>"
    return params


def site_signature(graph: Graph, match: Match) -> int:
    """A hash of the local structure a match binds (equal for the same rewrite at identical places)."""
    position = {name: i for i, name in enumerate(match.nodes)}
    parts: list[Any] = [match.rule, _params_key(graph, match.params)]
    for name in match.nodes:
        node = graph.nodes.get(name)
        if node is None:
            parts.append(None)
            continue
        reads = []
        for value in node.inputs:
            producer = graph.producer.get(value) if value else None
            source = (position[producer], graph.nodes[producer].outputs.index(value)) if producer in position else None
            reads.append((source, _value_key(graph, value) if value else None))
        writes = tuple((_value_key(graph, v), len(graph.consumers.get(v, ())), graph.is_graph_output(v))
                       for v in node.outputs if v)
        parts.append((node.signature, tuple(reads), writes))
    return hash(tuple(parts))


class ContentKeys:
    """Name-independent keys of values, matches and graphs (memoised on each graph, under this object).

    A graph reached again along another path has new names for the nodes and values the rewrites created;
    its structural hash is the same, and so are these keys: graph inputs and initializers by name (the
    initializers of a model never change along its rewrites: rewrites build new constants as nodes, whose
    attribute values their signatures hold), every other value by its producer's op, attributes and input
    keys. `match_key` names a match by the keys of what it binds."""

    def values(self, graph: Graph) -> dict[str, int]:
        """A key per value: graph inputs by name, initializers by content, every other value by its
        producer's op, attributes and input keys (memoised on the graph)."""
        memo = graph.memo()
        slot = ("xrlflow.sites.values", id(self))
        keys = memo.get(slot)
        if keys is None:
            keys = {"": 0}
            for name in graph.inputs:
                keys[name] = hash((1, name))
            for name in graph.initializers:
                if name not in keys:
                    keys[name] = hash((2, name))
            for name in graph.topological_order():
                node = graph.nodes[name]
                node_key = hash((node.signature, tuple(keys.get(v, hash((3, v))) for v in node.all_inputs)))
                for i, out in enumerate(node.outputs):
                    if out:
                        keys[out] = hash((node_key, i))
            memo[slot] = keys
        return keys

    def graph_key(self, graph: Graph) -> int:
        keys = self.values(graph)
        return hash((tuple(keys.get(v, 0) for v in graph.outputs), len(graph.nodes)))

    def match_key(self, graph: Graph, match: Match) -> tuple[Any, ...]:
        """The match by what it binds, not by node names: equal for the same rewrite at the same place of
        two graphs with equal keys."""
        keys = self.values(graph)
        bound = tuple(keys.get(graph.nodes[n].outputs[0], 0) if n in graph.nodes and graph.nodes[n].outputs else 0
                      for n in match.nodes)
        return (match.rule, bound, _params_key(graph, match.params))


def site_groups(graph: Graph, matches: Sequence[Match],
                signatures: Sequence[int] | None = None) -> list[tuple[Match, ...]]:
    """`matches` grouped by `site_signature` (or the given `signatures`, one per match), groups in order of
    their first match, each group's matches in the given order with overlapping ones (sharing a bound node
    with an earlier member) left out."""
    if signatures is None:
        signatures = [site_signature(graph, m) for m in matches]
    groups: dict[int, list[Match]] = {}
    used: dict[int, set[str]] = {}
    for match, key in zip(matches, signatures):
        members = groups.setdefault(key, [])
        taken = used.setdefault(key, set())
        if taken.isdisjoint(match.nodes):
            members.append(match)
            taken.update(match.nodes)
    return [tuple(members) for members in groups.values()]


def apply_at_sites(engine: RewriteEngine, graph: Graph, matches: Iterable[Match]) -> tuple[Graph, list[Match]]:
    """Apply the matches one after the other; returns the result and the matches applied (a path
    `RewriteEngine.apply_sequence` replays).

    The first match is applied as given (GraphError propagates: a rule bug, as for a single rewrite). A later
    match is applied only while it is still valid: when no node within `GUARD_HOPS` of its bound nodes was
    touched by the rewrites so far, what its rule's find() looked at is unchanged, so it is applied directly
    (and skipped if the rewrite would now close a cycle); otherwise it is applied only if the engine still
    offers it on the graph so far (a full re-match)."""
    applied: list[Match] = []
    current = graph
    touched: set[str] = set()
    for match in matches:
        if applied:
            near = _neighbourhood(graph, {n for n in match.nodes if n in graph.nodes}, GUARD_HOPS)
            if not near.isdisjoint(touched):
                if match not in engine.matches(current):
                    continue
            elif any(current.nodes.get(n) is not graph.nodes.get(n) for n in match.nodes):
                continue
        try:
            nxt = engine.apply(current, match)
        except GraphError:
            if not applied:
                raise
            continue  # valid alone, but after the other sites it would close a cycle
        removed, added = changed_nodes(current, nxt)
        touched |= removed | added
        # a new reader of an old value changes that value's use count, which find() conditions look at
        touched.update(p for n in added for v in nxt.nodes[n].inputs if v and (p := nxt.producer.get(v)) is not None)
        current = nxt
        applied.append(match)
    return current, applied


def changed_nodes(parent: Graph, child: Graph) -> tuple[set[str], set[str]]:
    """(names of parent nodes the child lacks or replaced, names of child nodes the parent lacks or had
    otherwise); node values are shared between graphs, so identity tells what a rewrite touched."""
    removed = {n for n, node in parent.nodes.items() if child.nodes.get(n) is not node}
    added = {n for n, node in child.nodes.items() if parent.nodes.get(n) is not node}
    return removed, added


def _neighbourhood(graph: Graph, start: set[str], radius: int) -> set[str]:
    seen = set(start)
    frontier = set(start)
    for _ in range(radius):
        nxt: set[str] = set()
        for name in frontier:
            node = graph.nodes[name]
            for value in node.all_inputs:
                producer = graph.producer.get(value) if value else None
                if producer is not None and producer not in seen:
                    nxt.add(producer)
            for value in node.outputs:
                for consumer in graph.consumers.get(value, ()):
                    if consumer not in seen:
                        nxt.add(consumer)
        seen |= nxt
        frontier = nxt
        if not frontier:
            break
    return seen


def subgraph(graph: Graph, names: set[str]) -> Graph:
    """The nodes `names` as a graph of their own: values they read from outside become inputs (constants
    stay constants), values read outside or by the graph's outputs become outputs."""
    nodes = {n: node for n, node in graph.nodes.items() if n in names}
    producer = {v: n for n, node in nodes.items() for v in node.outputs if v}
    consumers: dict[str, list[str]] = {}
    for n, node in nodes.items():
        for v in node.all_inputs:
            if v:
                consumers.setdefault(v, []).append(n)
    inputs = tuple(sorted({v for v in consumers if v not in producer and not graph.is_constant(v)}))
    outputs = tuple(v for n, node in nodes.items() for v in node.outputs if v and (
        graph.is_graph_output(v) or any(c not in nodes for c in graph.consumers.get(v, ()))))
    return Graph(nodes, graph.types, graph.initializers, inputs, outputs, graph.context, producer,
                 {v: tuple(c) for v, c in consumers.items()}, graph.constants, graph.next_id, graph.bound_dims)


def region_key(graph: Graph, match: Match, radius: int = LOCAL_RADIUS + 2, rounds: int = 3) -> tuple[Any, ...]:
    """A structural key of a match and the nodes within `radius` of it, independent of names: equal keys
    mean (up to a hash collision) the same rewrite of the same surroundings, so `local_cost_delta` gives the
    same number. A few Weisfeiler-Lehman rounds over the region: each node's label starts from its op,
    attributes and the types and constness of its values, then takes in its producers' labels by input
    position and its readers' labels as a sorted multiset (nodes outside the region count as one label)."""
    near = _neighbourhood(graph, {n for n in match.nodes if n in graph.nodes}, radius)
    label: dict[str, int] = {}
    for name in near:
        node = graph.nodes[name]
        label[name] = hash((node.signature, tuple(_value_key(graph, v) if v else None for v in node.inputs),
                            tuple((_value_key(graph, v), graph.is_graph_output(v)) for v in node.outputs if v)))
    for _ in range(rounds):
        nxt: dict[str, int] = {}
        for name in near:
            node = graph.nodes[name]
            producers = tuple(label.get(graph.producer.get(v, ""), 0) if v else None for v in node.inputs)
            readers = tuple(sorted(label.get(c, 0) for v in node.outputs if v for c in graph.consumers.get(v, ())))
            nxt[name] = hash((label[name], producers, readers))
        label = nxt
    bound = tuple(label.get(n, 0) for n in match.nodes)
    return (match.rule, _params_key(graph, match.params), bound, tuple(sorted(label.values())))


def local_cost_delta(service: LatencyService, parent: Graph, child: Graph, radius: int = LOCAL_RADIUS) -> float:
    """The latency change (ms, child minus parent) a rewrite makes, priced on the changed region only."""
    removed, added = changed_nodes(parent, child)
    if not removed and not added:
        return 0.0
    around = (_neighbourhood(parent, removed, radius) - removed) | (_neighbourhood(child, added, radius) - added)
    unchanged = {n for n in around if parent.nodes.get(n) is not None and parent.nodes.get(n) is child.nodes.get(n)}
    before = service.latency(subgraph(parent, removed | unchanged))
    after = service.latency(subgraph(child, added | unchanged))
    return after.ms - before.ms


__all__ = ["ContentKeys", "GUARD_HOPS", "LOCAL_RADIUS", "apply_at_sites", "region_key", "changed_nodes", "local_cost_delta", "site_groups", "site_signature",
           "subgraph"]

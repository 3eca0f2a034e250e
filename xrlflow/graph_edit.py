"""`GraphEdit`: a rewrite's node additions, removals and value replacements, committed into a new `Graph`
(pinned values keep their names, dead code is eliminated, the constness of added nodes is propagated)."""

from __future__ import annotations

from typing import Any, Iterable

from xrlflow.errors import GraphError
from xrlflow.ir import PURE_OPS, Graph, Node, TensorType, make_attributes


class GraphEdit:
    """Collects node additions, removals and value replacements, then commits them into a new Graph.

    `replace_value(old, new)` rewires every reader of `old` to `new`. Pinned values (graph outputs and values
    read from inside If/Loop/Scan bodies) keep their names: the new producer is renamed to `old`, or, where
    that is impossible, an Identity carries `new` to `old`. Nodes left without readers are removed
    (dead-code elimination starting from what the edit touched).
    """

    def __init__(self, graph: Graph, origin: str) -> None:
        self.graph = graph
        self.origin = origin or "xrlflow"
        self.added: list[Node] = []
        self.removed: set[str] = set()
        self.replacements: dict[str, str] = {}
        self.new_types: dict[str, TensorType] = {}
        self.next_id = graph.next_id

    def _fresh(self, stem: str) -> str:
        while True:
            self.next_id += 1
            name = f"{self.origin}/{stem}_{self.next_id}"
            if name not in self.graph.types and name not in self.graph.nodes:
                return name

    def add(
        self,
        op_type: str,
        inputs: Iterable[str],
        output_types: Iterable[TensorType],
        attributes: tuple[tuple[str, Any], ...] = (),
        domain: str = "",
    ) -> list[str]:
        """Add a node (of `domain`, "" for the default one); returns the names of its (new) outputs."""
        node_name = self._fresh(op_type)
        outputs = []
        for i, t in enumerate(output_types):
            value = f"{node_name}_{i}"
            self.new_types[value] = t
            outputs.append(value)
        self.added.append(Node(node_name, op_type, tuple(inputs), tuple(outputs), attributes, domain, origin=self.origin))
        return outputs

    def add1(self, op_type: str, inputs: Iterable[str], output_type: TensorType, **attributes: Any) -> str:
        """Add a single-output node with keyword attributes; returns its output."""
        return self.add(op_type, inputs, [output_type], make_attributes(**attributes))[0]

    def remove(self, *node_names: str) -> None:
        self.removed.update(node_names)

    def replace_value(self, old: str, new: str) -> None:
        if old != new:
            self.replacements[old] = new

    def commit(self) -> Graph:
        g = self.graph
        nodes = dict(g.nodes)
        types = dict(g.types)
        producer = dict(g.producer)
        consumers = dict(g.consumers)
        constants = set(g.constants)
        pinned = g.pinned_values()

        def resolve(v: str) -> str:
            for _ in range(1000):
                if v not in self.replacements:
                    return v
                v = self.replacements[v]
            raise GraphError("cyclic value replacement")

        final = {old: resolve(old) for old in self.replacements}
        added_outputs = {v for n in self.added for v in n.outputs}
        rename: dict[str, str] = {}  # an added node's output -> the pinned name it takes
        added = list(self.added)
        for old, new in final.items():
            if old not in pinned or new == old:
                continue
            if new in added_outputs and new not in rename and new not in pinned:
                rename[new] = old
            else:
                added.append(Node(self._fresh("Identity"), "Identity", (new,), (old,), origin=self.origin))
                if old in g.types:
                    self.new_types.setdefault(old, g.types[old])

        def name_of(v: str) -> str:
            if v in final and v not in pinned:
                v = final[v]
            return rename.get(v, v)

        touched: set[str] = set()
        rewired: list[str] = []

        def drop_node(name: str) -> None:
            node = nodes.pop(name)
            for v in node.all_inputs:
                if v and v in consumers:
                    uses = list(consumers[v])
                    uses.remove(name)
                    consumers[v] = tuple(uses)
                    touched.add(v)
            for v in node.outputs:
                if producer.get(v) == name:
                    del producer[v]
                    constants.discard(v)

        for name in sorted(self.removed):
            if name in nodes:
                drop_node(name)
        # Producers of pinned values that an Identity or a renamed node now produces must go.
        for old in set(rename.values()) | {o for n in added[len(self.added):] for o in n.outputs}:
            p = producer.get(old)
            if p is None or p not in nodes:
                continue
            # Outputs that this edit replaces too lose their readers (or are re-produced) below; only the
            # others keep the old producer alive.
            kept = [v for v in nodes[p].outputs if v != old and v not in final]
            if any(consumers.get(v) or v in pinned for v in kept):
                raise GraphError(f"cannot re-produce pinned value {old!r} while {p!r} stays in use")
            drop_node(p)

        for old in final:
            if old in pinned:
                continue
            readers = consumers.pop(old, ())
            touched.add(old)
            new = name_of(old)
            for reader in readers:  # one entry per use
                if reader in nodes:
                    consumers[new] = consumers.get(new, ()) + (reader,)
            for reader in dict.fromkeys(readers):
                if reader in nodes:
                    rewired.append(reader)
                    node = nodes[reader]
                    nodes[reader] = node.with_inputs(tuple(name_of(v) if v else v for v in node.inputs))

        for node in added:
            node = Node(
                node.name, node.op_type, tuple(name_of(v) if v else v for v in node.inputs),
                tuple(rename.get(v, v) for v in node.outputs), node.attributes, node.domain, node.origin,
            )
            nodes[node.name] = node
            for v in node.outputs:
                producer[v] = node.name
            for v in node.inputs:
                if v:
                    consumers[v] = consumers.get(v, ()) + (node.name,)
        for value, t in self.new_types.items():
            types[rename.get(value, value)] = t
        for new in rename:
            types.pop(new, None)

        # Dead-code elimination from everything the edit touched.
        stack = [producer[v] for v in touched if v in producer] + [n.name for n in added]
        while stack:
            name = stack.pop()
            node = nodes.get(name)
            if node is None or any(consumers.get(v) or v in pinned for v in node.outputs):
                continue
            drop_node(name)
            for v in node.outputs:
                types.pop(v, None)
                consumers.pop(v, None)
            stack.extend(producer[v] for v in node.all_inputs if v in producer)
        for v in [v for v, readers in consumers.items() if not readers]:
            del consumers[v]

        # A rewrite must never leave a node reading a value nothing produces (a rule bug: fail here, not at export).
        graph_inputs = set(g.inputs)
        for name in rewired + [n.name for n in added]:
            node = nodes.get(name)
            if node is None:
                continue
            for v in node.inputs:
                if v and v not in producer and v not in g.initializers and v not in graph_inputs:
                    raise GraphError(f"{self.origin}: node {name!r} would read {v!r}, which nothing produces")

        for node in _in_order(added, nodes):
            if node.op_type in PURE_OPS and all((not v) or v in constants for v in node.inputs):
                constants.update(v for v in node.outputs if v)

        return Graph(
            nodes, types, g.initializers, g.inputs, g.outputs, g.context, producer, consumers,
            frozenset(constants), self.next_id, g.bound_dims.extended(self.added, g),
        )


def _in_order(added: list[Node], nodes: dict[str, Node]) -> list[Node]:
    """The added nodes that survived, producers before consumers."""
    alive = {n.name: nodes[n.name] for n in added if n.name in nodes}
    produced = {v: name for name, n in alive.items() for v in n.outputs}
    done: set[str] = set()
    ordered: list[Node] = []
    for start in alive:
        stack = [(start, False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            if expanded:
                done.add(name)
                ordered.append(alive[name])
                continue
            stack.append((name, True))
            for v in alive[name].inputs:
                p = produced.get(v)
                if p is not None and p not in done:
                    stack.append((p, False))
    return ordered

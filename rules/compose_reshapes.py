"""compose-reshapes, cancel-identity-reshape.

Reshape(Reshape(x, S1), S2) = Reshape(x, S2), and a Reshape to its input's own shape is no op. Exporters
wrap a batched Transpose in such Reshapes (torch's SDPA decomposition flattens [b, h, s, d] to [b*h, s, d],
transposes, and reshapes back); once move-transpose-before-reshape has moved the Transpose out, these two
leave it next to the other layout Transposes it composes with. No reverse: splitting a Reshape in two has no
choice a rule could make.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph
from xrlflow.rules.common import ints_constant, rewritable
from xrlflow.rules.common import computed, producer_op
from xrlflow.rules.transpose_reshape import free_dims


class ComposeReshapes(Rule):
    name = "compose-reshapes"
    description = (
        "Reshape(Reshape(x, S1), S2) -> Reshape(x, S2). Pays by enabling: the outer Reshape meets x's producer "
        "(a Transpose it commutes with, or a Reshape to x's own shape that cancels)."
    )
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for outer in g.by_op("Reshape"):
            if not rewritable(outer) or not computed(g, outer.outputs[0]):
                continue
            inner = producer_op(g, outer.inputs[0], "Reshape")
            if inner is None or not free_dims(g, inner.inputs[0], outer.outputs[0]):
                continue
            yield (outer.name, inner.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        out = outer.outputs[0]
        e = GraphEdit(g, self.name)
        e.replace_value(out, e.add1("Reshape", [inner.inputs[0], ints_constant(e, g.static_shape(out))], g.types[out]))  # type: ignore[arg-type]
        return e.commit()


class CancelIdentityReshape(Rule):
    name = "cancel-identity-reshape"
    description = "Reshape(x) to x's own static shape -> x. Pays directly (a node fewer) and by enabling neighbours."
    reverse = None

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Reshape"):
            if not rewritable(node) or not computed(g, node.outputs[0]):
                continue
            shape = g.static_shape(node.inputs[0])
            if shape is not None and shape == g.static_shape(node.outputs[0]) and g.types[node.inputs[0]] == g.types[node.outputs[0]]:
                yield (node.name,), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        node = g.nodes[nodes[0]]
        e = GraphEdit(g, self.name)
        e.replace_value(node.outputs[0], node.inputs[0])
        return e.commit()

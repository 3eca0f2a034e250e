"""move-scale-into-matmul / move-scale-out-of-matmul.

(A@B)*s = (A*s)@B = A@(B*s) for a constant scalar s (and likewise /s). Attention scales its scores,
Mul(Q@K^T, 1/sqrt(d)); the scale can sit on the scores (where onnxruntime folds a scalar Mul that follows a
MatMul into FusedMatMul's alpha), on Q, or, through the layout moves, next to Q's projection where
fold-scale-into-matmul folds it into the weight. Both operands may be computed (fold-scale-into-matmul covers
constant weights).
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node
from xrlflow.rules.common import broadcast_shape, rewritable, sole_reader
from xrlflow.rules.common import other_operand
from xrlflow.rules.common import FLOAT_TYPES, is_scalar_constant
from xrlflow.rules.common import computed


def scalar_of(g: Graph, node: Node, operand: str) -> str | None:
    """s of Mul(operand, s), Mul(s, operand) or Div(operand, s), s a float scalar constant of operand's dtype."""
    if not rewritable(node) or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    if node.op_type == "Div" and node.inputs[0] != operand:
        return None
    s = other_operand(node, operand)
    if s == operand or not is_scalar_constant(g, s) or g.dtype(s) != g.dtype(operand) or g.dtype(s) not in FLOAT_TYPES:
        return None
    return s


def rank_ok(g: Graph, value: str, s: str) -> bool:
    """Scaling `value` by s keeps its shape (s has no more axes than value)."""
    vs, ss = g.static_shape(value), g.static_shape(s)
    return vs is not None and ss is not None and broadcast_shape(vs, ss) == vs


class MoveScaleIntoMatMul(Rule):
    name = "move-scale-into-matmul"
    description = (
        "Mul(A@B, s) or Div(A@B, s), s a constant scalar -> (A op s)@B or A@(B op s). Pays by enabling: the "
        "scale moves towards Q's projection (fold-scale-into-matmul folds it into the weight) or onto an "
        "operand that is scaled anyway."
    )
    reverse = "move-scale-out-of-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]):
                continue
            after = sole_reader(g, mm.outputs[0])
            if after is None or scalar_of(g, after, mm.outputs[0]) is None:
                continue
            s = scalar_of(g, after, mm.outputs[0])
            if g.static_shape(after.outputs[0]) != g.static_shape(mm.outputs[0]):
                continue
            for position in (0, 1):
                operand = mm.inputs[position]
                if computed(g, operand) and rank_ok(g, operand, s):  # type: ignore[arg-type]
                    yield (mm.name, after.name), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, after = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (position,) = params
        s = other_operand(after, mm.outputs[0])
        operand = mm.inputs[position]
        e = GraphEdit(g, self.name)
        scaled = e.add(after.op_type, [operand, s], [g.types[operand]], after.attributes)[0]
        inputs = list(mm.inputs)
        inputs[position] = scaled
        e.replace_value(after.outputs[0], e.add1("MatMul", inputs, g.types[after.outputs[0]]))
        return e.commit()


class MoveScaleOutOfMatMul(Rule):
    name = "move-scale-out-of-matmul"
    description = (
        "(A op s)@B or A@(B op s) for Mul/Div by a constant scalar s, A op s computed -> (A@B) op s. Reverse of "
        "move-scale-into-matmul; pays directly where onnxruntime folds the scalar into FusedMatMul's alpha, "
        "and where the scaled operand was larger than the product."
    )
    reverse = "move-scale-into-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]) or g.static_shape(mm.outputs[0]) is None:
                continue
            for position in (0, 1):
                value = mm.inputs[position]
                node = g.producer_of(value)
                if node is None or node.op_type not in ("Mul", "Div") or sole_reader(g, value) is not mm:
                    continue
                for operand in dict.fromkeys(node.inputs if node.op_type == "Mul" else node.inputs[:1]):
                    s = scalar_of(g, node, operand)
                    if s is None or not computed(g, operand) or not rank_ok(g, operand, s):
                        continue
                    if g.static_shape(operand) != g.static_shape(value):
                        continue
                    yield (mm.name, node.name), (position, operand)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        position, operand = params
        s = other_operand(node, operand)
        inputs = list(mm.inputs)
        inputs[position] = operand
        out = mm.outputs[0]
        e = GraphEdit(g, self.name)
        product = e.add1("MatMul", inputs, g.types[out])
        e.replace_value(out, e.add(node.op_type, [product, s], [g.types[out]], node.attributes)[0])
        return e.commit()

"""fold-const-chain / unfold-const-chain, fold-scale-into-matmul / unfold-scale-from-matmul.

(X+c1)+c2 -> X+(c1+c2) and (X*c1)*c2 -> X*(c1*c2): onnxruntime folds c1 op c2 at session creation, so one
elementwise pass over the activation disappears; onnxruntime does not re-associate constant chains.
Mul(X@W, s), Div(X@W, s), (X*s)@W and (X/s)@W with constant W and a constant scalar s -> X@(W op s): the
scale (attention's 1/sqrt(d)) moves into a weight that is folded, which removes an elementwise kernel, keeps
MatMul+Add -> Gemm fusion possible, and leaves a plain projection that merge-parallel-matmul can batch with
its unscaled siblings.
"""

from __future__ import annotations

from typing import Any, Iterator


from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import (
    CHAIN_OPS, FLOAT_TYPES, broadcast_shape, computed, matmul_shape, other_operand, producer_op, is_scalar_constant, read_once_producer,
    regroup, rewritable, shape_of, sole_reader,
)

def constant_operand(g: Graph, node: Node) -> tuple[str, str] | None:
    """(the computed operand, the constant operand) of a binary node with exactly one constant input."""
    left, right = node.inputs
    if g.is_constant(right) and computed(g, left):
        return left, right
    if g.is_constant(left) and computed(g, right):
        return right, left
    return None


def constant_links(g: Graph) -> Iterator[tuple[str, Node, str, str]]:
    """(op, node, computed operand, constant operand) for every rewritable Add/Mul with exactly one constant input."""
    for op in CHAIN_OPS:
        for outer in g.by_op(op):
            if not rewritable(outer):
                continue
            split_outer = constant_operand(g, outer)
            if split_outer is not None:
                yield (op, outer, *split_outer)


class FoldConstChain(Rule):
    name = "fold-const-chain"
    description = (
        "(X+c1)+c2 -> X+(c1+c2) and (X*c1)*c2 -> X*(c1*c2) for constants c1, c2 (inner op read once, operand "
        "order either way). Pays directly: onnxruntime folds c1 op c2, one elementwise pass fewer."
    )
    reverse = "unfold-const-chain"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op, outer, inner_out, c2 in constant_links(g):
            inner = read_once_producer(g, inner_out, op, outer)
            if inner is None:
                continue
            split_inner = constant_operand(g, inner)
            if split_inner is None:
                continue
            x, c1 = split_inner
            if len({g.dtype(v) for v in (x, c1, c2)}) != 1:
                continue
            folded = shape_of(g, c1, c2)
            if folded is None or broadcast_shape(g.static_shape(x), folded) != g.static_shape(outer.outputs[0]):  # type: ignore[arg-type]
                continue
            yield (outer.name, inner.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        _, c2 = constant_operand(g, outer)  # type: ignore[misc]
        x, c1 = constant_operand(g, inner)  # type: ignore[misc]
        return regroup(g, self.name, outer, (c1, c2), x, grouped_first=False)


class UnfoldConstChain(Rule):
    name = "unfold-const-chain"
    description = (
        "X op (c1 op c2) -> (X op c1) op c2 for op in Add, Mul when the constant is an op node of two constants "
        "read once. Reverse of fold-const-chain; pays when X op c1 then fuses into X's producer (bias into Gemm, "
        "scale into Conv) or c2 can move on through a later rule."
    )
    reverse = "fold-const-chain"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op, outer, x, c in constant_links(g):
            folded = read_once_producer(g, c, op, outer)
            if folded is None:
                continue
            c1, c2 = folded.inputs
            if not (g.is_constant(c1) and g.is_constant(c2)) or len({g.dtype(v) for v in (x, c1, c2)}) != 1:
                continue
            step = shape_of(g, x, c1)
            if step is None or broadcast_shape(step, g.static_shape(c2)) != g.static_shape(outer.outputs[0]):  # type: ignore[arg-type]
                continue
            yield (outer.name, folded.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, folded = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x, _ = constant_operand(g, outer)  # type: ignore[misc]
        c1, c2 = folded.inputs
        return regroup(g, self.name, outer, (x, c1), c2, grouped_first=True)


class FoldScaleIntoMatMul(Rule):
    name = "fold-scale-into-matmul"
    description = (
        "Mul(X@W, s), Div(X@W, s), (X*s)@W, (X/s)@W with constant W and constant scalar s -> X@(W op s). Pays: "
        "the scale folds into the weight (one elementwise kernel fewer, MatMul+Add -> Gemm fusion kept) and the "
        "projection becomes plain, so merge-parallel-matmul can batch it with its siblings."
    )
    reverse = "unfold-scale-from-matmul"

    def _scale(self, g: Graph, node: Node, operand: str) -> str | None:
        """The scalar s of Mul(operand, s), Mul(s, operand) or Div(operand, s)."""
        if not rewritable(node) or node.op_type not in ("Mul", "Div"):
            return None
        if node.op_type == "Div" and node.inputs[0] != operand:
            return None
        s = other_operand(node, operand)
        return s if s != operand and is_scalar_constant(g, s) else None

    def _weight_ok(self, g: Graph, mm: Node, scale: str, new_input: str, out: str) -> bool:
        w = mm.inputs[1]
        if not g.is_constant(w) or g.dtype(w) not in FLOAT_TYPES or len({g.dtype(w), g.dtype(scale), g.dtype(new_input)}) != 1:
            return False
        w_scaled = shape_of(g, w, scale)
        x_shape = g.static_shape(new_input)
        return w_scaled is not None and x_shape is not None and matmul_shape(x_shape, w_scaled) == g.static_shape(out)

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]):
                continue
            after = sole_reader(g, mm.outputs[0])
            if after is not None:
                s = self._scale(g, after, mm.outputs[0])
                if s is not None and self._weight_ok(g, mm, s, mm.inputs[0], after.outputs[0]):
                    yield (mm.name, after.name), ("after",)
            before = producer_op(g, mm.inputs[0], "Mul") or producer_op(g, mm.inputs[0], "Div")
            if before is not None and sole_reader(g, mm.inputs[0]) is mm:
                for x in dict.fromkeys(before.inputs):
                    s = self._scale(g, before, x)
                    if s is not None and computed(g, x) and self._weight_ok(g, mm, s, x, mm.outputs[0]):
                        yield (mm.name, before.name), ("before", x)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, scale_node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        w = mm.inputs[1]
        if params[0] == "after":
            x, out, s = mm.inputs[0], scale_node.outputs[0], other_operand(scale_node, mm.outputs[0])
        else:
            x, out = params[1], mm.outputs[0]
            s = other_operand(scale_node, x)
        e = GraphEdit(g, self.name)
        weight = e.add1(scale_node.op_type, [w, s], TensorType(g.dtype(w), shape_of(g, w, s)))  # type: ignore[arg-type]
        e.replace_value(out, e.add1("MatMul", [x, weight], g.types[out]))
        return e.commit()


class UnfoldScaleFromMatMul(Rule):
    name = "unfold-scale-from-matmul"
    description = (
        "X@(W*s) or X@(W/s) with constant W and constant scalar s -> (X@W)*s or (X@W)/s. Reverse of "
        "fold-scale-into-matmul; pays when the scale then moves on (onnxruntime folds a scale that follows a "
        "MatMul into FusedMatMul) or W must stay shared with an unscaled MatMul."
    )
    reverse = "fold-scale-into-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]):
                continue
            x, scaled = mm.inputs
            node = g.producer_of(scaled)
            if node is None or node.op_type not in ("Mul", "Div") or not rewritable(node) or sole_reader(g, scaled) is not mm:
                continue
            for w in dict.fromkeys(node.inputs if node.op_type == "Mul" else node.inputs[:1]):
                s = other_operand(node, w)
                if s == w or not is_scalar_constant(g, s) or not g.is_constant(w) or g.dtype(w) not in FLOAT_TYPES:
                    continue
                x_shape, w_shape = g.static_shape(x), g.static_shape(w)
                if x_shape is None or w_shape is None or len({g.dtype(v) for v in (x, w, s)}) != 1:
                    continue
                product = matmul_shape(x_shape, w_shape)
                if product is None or shape_of(g, s) is None:
                    continue
                if broadcast_shape(product, g.static_shape(s)) != g.static_shape(mm.outputs[0]):  # type: ignore[arg-type]
                    continue
                yield (mm.name, node.name), (w,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (w,) = params
        x = mm.inputs[0]
        s = other_operand(node, w)
        e = GraphEdit(g, self.name)
        product = matmul_shape(g.static_shape(x), g.static_shape(w))  # type: ignore[arg-type]
        y = e.add1("MatMul", [x, w], TensorType(g.dtype(x), product))  # type: ignore[arg-type]
        e.replace_value(mm.outputs[0], e.add1(node.op_type, [y, s], g.types[mm.outputs[0]]))
        return e.commit()

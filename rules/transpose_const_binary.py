"""move-transpose-after-const-binary / move-transpose-before-const-binary.

x op c with a broadcast constant c (bias Add, scale Mul, Sub, Div) commutes with a Transpose once c is laid
out the same way: op(Transpose(x, p), c) = Transpose(op(x, c'), p) with c' = Transpose(Reshape(c, full
rank), p^-1). The rule emits c's Reshape/Transpose as nodes and onnxruntime folds them at session creation:
rules never compute weights themselves. This carries a layout Transpose across a projection's bias or
attention's scale, to the MatMul or Split it can fold into.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import broadcast_shape, ints_constant, rewritable, sole_reader
from xrlflow.rules.compose_transposes import invert, permuted, transpose_perm
from xrlflow.rules.common import computed, producer_op

CONST_BINARY = ("Add", "Sub", "Mul", "Div")


def split_const(g: Graph, node: Node) -> tuple[int, str, str] | None:
    """(position of the computed operand, computed operand, constant) of a binary op with one constant side."""
    if not rewritable(node) or len(node.inputs) != 2:
        return None
    for position in (0, 1):
        x, c = node.inputs[position], node.inputs[1 - position]
        if computed(g, x) and g.is_constant(c) and g.static_shape(c) is not None and g.dtype(c) == g.dtype(x):
            return position, x, c
    return None


def laid_out(e, g: Graph, c: str, rank: int, perm: tuple[int, ...]) -> str | None:
    """c broadcast to `rank` axes then transposed by `perm`; c itself when it has one element."""
    shape = g.static_shape(c)
    if shape is None or len(shape) > rank:
        return None
    if all(d == 1 for d in shape):
        return c
    full = (1,) * (rank - len(shape)) + tuple(shape)
    value = c
    if len(shape) < rank:
        value = e.add1("Reshape", [c, ints_constant(e, full)], TensorType(g.dtype(c), full))
    return e.add1("Transpose", [value], TensorType(g.dtype(c), permuted(full, perm)), perm=perm)


def keeps_shape(g: Graph, x: str, c: str, out: str) -> bool:
    """op(x, c) has x's shape (c broadcasts into x without enlarging it)."""
    xs, cs = g.static_shape(x), g.static_shape(c)
    return xs is not None and cs is not None and len(cs) <= len(xs) and broadcast_shape(xs, cs) == xs == g.static_shape(out)


def binary(e, op: Node, position: int, x: str, c: str, out_type: TensorType) -> str:
    operands = [x, c] if position == 0 else [c, x]
    return e.add(op.op_type, operands, [out_type], op.attributes)[0]


class MoveTransposeAfterConstBinary(Rule):
    name = "move-transpose-after-const-binary"
    description = (
        "op(Transpose(x, p), c) -> Transpose(op(x, c'), p) for Add/Sub/Mul/Div with a constant c (c' is c's "
        "Reshape/Transpose, folded by onnxruntime). Pays by enabling: the Transpose moves on to a Split, "
        "Reshape or MatMul/Gemm that absorbs it, or cancels."
    )
    reverse = "move-transpose-before-const-binary"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op_type in CONST_BINARY:
            for op in g.by_op(op_type):
                parts = split_const(g, op)
                if parts is None or not computed(g, op.outputs[0]):
                    continue
                _, x, c = parts
                tr = producer_op(g, x, "Transpose")
                if tr is None or sole_reader(g, x) is not op or transpose_perm(g, tr) is None:
                    continue
                if g.static_shape(tr.inputs[0]) is None or not keeps_shape(g, x, c, op.outputs[0]):
                    continue
                yield (op.name, tr.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        op, tr = g.nodes[nodes[0]], g.nodes[nodes[1]]
        position, _, c = split_const(g, op)  # type: ignore[misc]
        perm = transpose_perm(g, tr)
        x = tr.inputs[0]
        e = GraphEdit(g, self.name)
        c_laid = laid_out(e, g, c, len(perm), invert(perm))  # type: ignore[arg-type]
        applied = binary(e, op, position, x, c_laid, g.types[x].with_shape(g.static_shape(x)))  # type: ignore[arg-type]
        e.replace_value(op.outputs[0], e.add1("Transpose", [applied], g.types[op.outputs[0]], perm=perm))
        return e.commit()


class MoveTransposeBeforeConstBinary(Rule):
    name = "move-transpose-before-const-binary"
    description = (
        "Transpose(op(x, c), p) -> op(Transpose(x, p), c') for Add/Sub/Mul/Div with a constant c (c' is c's "
        "Reshape/Transpose, folded by onnxruntime). Reverse of move-transpose-after-const-binary; pays by "
        "enabling: the Transpose reaches the MatMul/Gemm that computes x (transpose-matmul, transpose-gemm)."
    )
    reverse = "move-transpose-after-const-binary"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]) or transpose_perm(g, tr) is None:
                continue
            op = g.producer_of(tr.inputs[0])
            if op is None or op.op_type not in CONST_BINARY or sole_reader(g, op.outputs[0]) is not tr:
                continue
            parts = split_const(g, op)
            if parts is None or not keeps_shape(g, parts[1], parts[2], op.outputs[0]):
                continue
            yield (tr.name, op.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, op = g.nodes[nodes[0]], g.nodes[nodes[1]]
        position, x, c = split_const(g, op)  # type: ignore[misc]
        perm = transpose_perm(g, tr)
        e = GraphEdit(g, self.name)
        moved = e.add1("Transpose", [x], g.types[tr.outputs[0]], perm=perm)
        c_laid = laid_out(e, g, c, len(perm), perm)  # type: ignore[arg-type]
        e.replace_value(tr.outputs[0], binary(e, op, position, moved, c_laid, g.types[tr.outputs[0]]))  # type: ignore[arg-type]
        return e.commit()

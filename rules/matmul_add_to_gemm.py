"""matmul-add-to-gemm / gemm-to-matmul-add.

X@W + b with a rank-2 weight W becomes one Gemm on X's rows, Reshape(Gemm(Reshape(X, [rows, K]), W, b)),
and W@Y + b with Y's leading axes all 1 becomes Reshape(Gemm(W, Reshape(Y, [K, N]), b as a column)): the
transposed projection Gemm(W^T, X^T, b[:,None]) of a head-major attention layout. In Gemm form a Transpose
of an operand folds into transA/transB (absorb-transpose-into-gemm) after the Reshape has moved past it
(move-reshape-before-transpose); onnxruntime's own MatMul+Add -> Gemm fusion runs before its transpose
folding, so without this a Transpose feeding a projection stays a kernel. The reverse turns such a Gemm back.
Shapes must be static and not bound only by --input-shape (the Reshapes bake them).
"""

from __future__ import annotations

from math import prod
from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import ints_constant, rewritable, sole_reader
from xrlflow.rules.common import other_operand
from xrlflow.rules.common import computed, producer_op
from xrlflow.rules.transpose_reshape import free_dims


def bias_as(g: Graph, b: str, shape: tuple[int, ...]) -> bool:
    """b holds exactly the values of a Gemm bias of `shape` ((N,) or (M, 1)), laid out with size-1 axes."""
    b_shape = g.static_shape(b)
    if b_shape is None:
        return False
    squeezed = tuple(d for d in b_shape if d != 1)
    wanted = tuple(d for d in shape if d != 1)
    if squeezed != wanted:
        return False
    if shape[-1] == 1:  # a column: b's last axis must be 1 and the one before it the rows
        return len(b_shape) >= 2 and b_shape[-1] == 1 and b_shape[-2] == shape[0]
    return len(b_shape) >= 1 and b_shape[-1] == shape[-1]


def projection(g: Graph, add: Node) -> tuple[Node, str, str] | None:
    """(MatMul, bias, side) of Add(MatMul(..), bias) in Gemm reach; side 'right' for X@W, 'left' for W@Y."""
    if not rewritable(add) or len(add.inputs) != 2 or not computed(g, add.outputs[0]):
        return None
    for v in dict.fromkeys(add.inputs):
        mm = producer_op(g, v, "MatMul")
        if mm is None or sole_reader(g, v) is not add:
            continue
        b = other_operand(add, v)
        a_shape, w_shape, out = g.static_shape(mm.inputs[0]), g.static_shape(mm.inputs[1]), g.static_shape(add.outputs[0])
        if a_shape is None or w_shape is None or out is None or len({g.dtype(x) for x in (*mm.inputs, b)}) != 1:
            continue
        if out != g.static_shape(v) or not free_dims(g, mm.inputs[0], mm.inputs[1], add.outputs[0]):
            continue
        if len(w_shape) == 2 and len(a_shape) >= 2 and bias_as(g, b, (w_shape[1],)):
            return mm, b, "right"
        if len(a_shape) == 2 and len(w_shape) >= 2 and all(d == 1 for d in w_shape[:-2]) and bias_as(g, b, (a_shape[0], 1)):
            return mm, b, "left"
    return None


def reshaped(e, g: Graph, value: str, shape: tuple[int, ...]) -> str:
    if g.static_shape(value) == shape:
        return value
    return e.add1("Reshape", [value, ints_constant(e, shape)], TensorType(g.dtype(value), shape))


class MatMulAddToGemm(Rule):
    name = "matmul-add-to-gemm"
    description = (
        "X@W + b (rank-2 W) or W@Y + b (rank-2 W, Y's leading axes 1) -> Reshape(Gemm(Reshape(..), .., b)). "
        "Pays by enabling: a Transpose feeding the projection then folds into transA/transB "
        "(move-reshape-before-transpose, absorb-transpose-into-gemm), and the transposed projection keeps its "
        "bias in the Gemm."
    )
    reverse = "gemm-to-matmul-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for add in g.by_op("Add"):
            found = projection(g, add)
            if found is not None:
                yield (add.name, found[0].name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        add, mm = g.nodes[nodes[0]], g.nodes[nodes[1]]
        _, b, side = projection(g, add)  # type: ignore[misc]
        a, w = mm.inputs
        a_shape, w_shape, out = g.static_shape(a), g.static_shape(w), g.static_shape(add.outputs[0])
        e = GraphEdit(g, self.name)
        if side == "right":
            rows = prod(a_shape[:-1])  # type: ignore[index]
            inputs = [reshaped(e, g, a, (rows, a_shape[-1])), w, reshaped(e, g, b, (w_shape[1],))]  # type: ignore[index]
            gemm_shape = (rows, w_shape[1])  # type: ignore[index]
        else:
            inputs = [a, reshaped(e, g, w, w_shape[-2:]), reshaped(e, g, b, (a_shape[0], 1))]  # type: ignore[index, arg-type]
            gemm_shape = (a_shape[0], w_shape[-1])  # type: ignore[index]
        dtype = g.dtype(add.outputs[0])
        y = e.add1("Gemm", inputs, TensorType(dtype, gemm_shape))  # type: ignore[arg-type]
        if gemm_shape != out:
            y = e.add1("Reshape", [y, ints_constant(e, out)], g.types[add.outputs[0]])  # type: ignore[arg-type]
        e.replace_value(add.outputs[0], y)
        return e.commit()


class GemmToMatMulAdd(Rule):
    name = "gemm-to-matmul-add"
    description = (
        "Gemm(A, B, C) without flags, alpha = beta = 1 -> A@B + C (the Reshapes matmul-add-to-gemm added stay; "
        "they are free views). Reverse of matmul-add-to-gemm; pays when the MatMul then merges or reassociates "
        "with its neighbours."
    )
    reverse = "matmul-add-to-gemm"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for gemm in g.by_op("Gemm"):
            if not rewritable(gemm) or len(gemm.inputs) != 3 or not gemm.inputs[2] or not computed(g, gemm.outputs[0]):
                continue
            if any(gemm.attr(k, d) != d for k, d in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))):
                continue
            if not all(g.static_shape(v) for v in (*gemm.inputs, gemm.outputs[0])):
                continue
            yield (gemm.name,), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        gemm = g.nodes[nodes[0]]
        a, b, c = gemm.inputs
        out = gemm.outputs[0]
        e = GraphEdit(g, self.name)
        y = e.add1("MatMul", [a, b], g.types[out])
        e.replace_value(out, e.add1("Add", [y, c], g.types[out]))
        return e.commit()

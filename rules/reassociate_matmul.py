"""reassociate-matmul / split-matmul-chain.

(X@A)@B -> X@(A@B) for rank-2 A and B. When A and B are constants, A@B is a constant that onnxruntime folds at
session creation, so one MatMul over the activation disappears (a low-rank or stacked projection pair becomes
one projection). onnxruntime never re-associates MatMul chains itself. The reverse splits a chain again (it
pays when A@B is much larger than A and B: a low-rank factorisation).
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, TensorType
from xrlflow.rules.common import computed, matmul_shape, producer_op, rewritable, sole_reader


def _rank2(g: Graph, value: str) -> bool:
    shape = g.static_shape(value)
    return shape is not None and len(shape) == 2


class ReassociateMatMul(Rule):
    name = "reassociate-matmul"
    description = (
        "(X@A)@B -> X@(A@B) for rank-2 A, B when X@A has no other reader. Pays directly when A and B are "
        "constant (onnxruntime folds A@B: one GEMM over the activation fewer) or when A@B is small; "
        "onnxruntime never re-associates MatMul chains."
    )
    reverse = "split-matmul-chain"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for outer in g.by_op("MatMul"):
            if not rewritable(outer) or not computed(g, outer.outputs[0]):
                continue
            inner = producer_op(g, outer.inputs[0], "MatMul")
            if inner is None or sole_reader(g, inner.outputs[0]) is not outer:
                continue
            x, a = inner.inputs
            b = outer.inputs[1]
            if not (_rank2(g, a) and _rank2(g, b)) or len({g.dtype(x), g.dtype(a), g.dtype(b)}) != 1:
                continue
            x_shape, out_shape = g.static_shape(x), g.static_shape(outer.outputs[0])
            ab = matmul_shape(g.static_shape(a), g.static_shape(b))  # type: ignore[arg-type]
            if x_shape is None or ab is None or matmul_shape(x_shape, ab) != out_shape:
                continue
            yield (outer.name, inner.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x, a = inner.inputs
        b = outer.inputs[1]
        dtype = g.dtype(outer.outputs[0])
        e = GraphEdit(g, self.name)
        ab = e.add1("MatMul", [a, b], TensorType(dtype, matmul_shape(g.static_shape(a), g.static_shape(b))))
        y = e.add1("MatMul", [x, ab], g.types[outer.outputs[0]])
        e.replace_value(outer.outputs[0], y)
        return e.commit()


class SplitMatMulChain(Rule):
    name = "split-matmul-chain"
    description = (
        "X@(A@B) -> (X@A)@B when the rank-2 weight A@B has no other reader. Reverse of reassociate-matmul; pays "
        "when A@B is a low-rank product (fewer FLOPs through the thin middle) and lets the search undo a fold."
    )
    reverse = "reassociate-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for outer in g.by_op("MatMul"):
            if not rewritable(outer) or not computed(g, outer.outputs[0]):
                continue
            x, w = outer.inputs
            inner = producer_op(g, w, "MatMul")
            if inner is None or sole_reader(g, w) is not outer or not _rank2(g, w):
                continue
            a, b = inner.inputs
            if not (_rank2(g, a) and _rank2(g, b)) or len({g.dtype(x), g.dtype(a), g.dtype(b)}) != 1:
                continue
            x_shape, out_shape = g.static_shape(x), g.static_shape(outer.outputs[0])
            if x_shape is None:
                continue
            xa = matmul_shape(x_shape, g.static_shape(a))  # type: ignore[arg-type]
            if xa is None or matmul_shape(xa, g.static_shape(b)) != out_shape:  # type: ignore[arg-type]
                continue
            yield (outer.name, inner.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        outer, inner = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = outer.inputs[0]
        a, b = inner.inputs
        e = GraphEdit(g, self.name)
        xa_shape = matmul_shape(g.static_shape(x), g.static_shape(a))  # type: ignore[arg-type]
        xa = e.add1("MatMul", [x, a], TensorType(g.dtype(x), xa_shape))  # type: ignore[arg-type]
        y = e.add1("MatMul", [xa, b], g.types[outer.outputs[0]])
        e.replace_value(outer.outputs[0], y)
        return e.commit()

"""transpose-matmul / untranspose-matmul, move-transpose-before-unary / move-transpose-after-unary.

(A@B)^T = B^T @ A^T (transposing the last two axes). onnxruntime folds a Transpose that feeds a MatMul into
the GEMM (MatMul transpose fusion) and folds transposes of constants, but it cannot fold a Transpose that
reads a MatMul's output: moving it to the inputs turns an explicit layout copy into GEMM flags. Moving a
Transpose through an elementwise activation brings it next to the MatMul or Transpose it can fold or cancel
with, in either direction.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import computed, matmul_shape, producer_op, rewritable, sole_reader

TRANSPOSABLE_UNARY = frozenset({"Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "LeakyRelu"})


def perm_of(node: Node, rank: int) -> tuple[int, ...]:
    perm = node.attr("perm")
    return tuple(reversed(range(rank))) if perm is None else tuple(int(p) for p in perm)


def swap_last_two(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def swaps_last_two(g: Graph, node: Node) -> bool:
    """A Transpose of a rank >= 2 value that swaps exactly its last two axes."""
    shape = g.static_shape(node.inputs[0])
    return shape is not None and len(shape) >= 2 and perm_of(node, len(shape)) == swap_last_two(len(shape))


def transposed_type(g: Graph, value: str) -> TensorType:
    shape = g.static_shape(value)
    return TensorType(g.dtype(value), shape[:-2] + (shape[-1], shape[-2]))  # type: ignore[arg-type, index]


def transpose_last_two(e, g: Graph, value: str) -> str:
    return e.add1("Transpose", [value], transposed_type(g, value), perm=swap_last_two(len(g.static_shape(value))))


class TransposeMatMul(Rule):
    name = "transpose-matmul"
    description = (
        "Transpose(A@B) over the last two axes -> B^T @ A^T. Pays because onnxruntime folds transposes of MatMul "
        "inputs into the GEMM (and transposes of constant weights at load), never one of a MatMul's output."
    )
    reverse = "untranspose-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]) or not swaps_last_two(g, tr):
                continue
            mm = producer_op(g, tr.inputs[0], "MatMul")
            if mm is None or sole_reader(g, mm.outputs[0]) is not tr:
                continue
            a, b = mm.inputs
            a_shape, b_shape = g.static_shape(a), g.static_shape(b)
            if a_shape is None or b_shape is None or len(a_shape) < 2 or len(b_shape) < 2:
                continue
            bt, at = transposed_type(g, b).shape, transposed_type(g, a).shape
            if matmul_shape(bt, at) != g.static_shape(tr.outputs[0]):  # type: ignore[arg-type]
                continue
            yield (tr.name, mm.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, mm = g.nodes[nodes[0]], g.nodes[nodes[1]]
        a, b = mm.inputs
        e = GraphEdit(g, self.name)
        y = e.add1("MatMul", [transpose_last_two(e, g, b), transpose_last_two(e, g, a)], g.types[tr.outputs[0]])
        e.replace_value(tr.outputs[0], y)
        return e.commit()


class UntransposeMatMul(Rule):
    name = "untranspose-matmul"
    description = (
        "MatMul(Transpose(B), Transpose(A)) with last-two-axes perms -> Transpose(A@B). Reverse of "
        "transpose-matmul; pays when the output Transpose then cancels with a following Transpose."
    )
    reverse = "transpose-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]):
                continue
            t1, t2 = (producer_op(g, v, "Transpose") for v in mm.inputs)
            if t1 is None or t2 is None or not swaps_last_two(g, t1) or not swaps_last_two(g, t2):
                continue
            if sole_reader(g, mm.inputs[0]) is not mm or sole_reader(g, mm.inputs[1]) is not mm:
                continue
            a, b = t2.inputs[0], t1.inputs[0]
            ab = matmul_shape(g.static_shape(a), g.static_shape(b))  # type: ignore[arg-type]
            out = g.static_shape(mm.outputs[0])
            if ab is None or out is None or ab[:-2] + (ab[-1], ab[-2]) != out:
                continue
            yield (mm.name, t1.name, t2.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, t1, t2 = (g.nodes[n] for n in nodes)
        a, b = t2.inputs[0], t1.inputs[0]
        ab_shape = matmul_shape(g.static_shape(a), g.static_shape(b))  # type: ignore[arg-type]
        e = GraphEdit(g, self.name)
        ab = e.add1("MatMul", [a, b], TensorType(g.dtype(mm.outputs[0]), ab_shape))  # type: ignore[arg-type]
        y = e.add1("Transpose", [ab], g.types[mm.outputs[0]], perm=swap_last_two(len(ab_shape)))  # type: ignore[arg-type]
        e.replace_value(mm.outputs[0], y)
        return e.commit()


class MoveTransposeBeforeUnary(Rule):
    name = "move-transpose-before-unary"
    description = (
        "Transpose(f(x)) -> f(Transpose(x)) for f in Relu, Sigmoid, Tanh, Gelu, Erf, LeakyRelu (same attributes). "
        "Pays by enabling: the Transpose meets x's producer, where onnxruntime folds it into a MatMul or cancels "
        "it with another Transpose, or transpose-matmul applies."
    )
    reverse = "move-transpose-after-unary"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]):
                continue
            f = g.producer_of(tr.inputs[0])
            if f is None or f.op_type not in TRANSPOSABLE_UNARY or not rewritable(f) or len(f.inputs) != 1:
                continue
            shape = g.static_shape(f.inputs[0])
            if sole_reader(g, tr.inputs[0]) is not tr or shape is None:
                continue
            if sorted(perm_of(tr, len(shape))) != list(range(len(shape))):
                continue
            yield (tr.name, f.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, f = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = f.inputs[0]
        out_type = g.types[tr.outputs[0]]
        e = GraphEdit(g, self.name)
        moved = e.add1("Transpose", [x], TensorType(g.dtype(x), out_type.shape), perm=perm_of(tr, len(g.static_shape(x))))  # type: ignore[arg-type]
        y = e.add(f.op_type, [moved], [out_type], f.attributes)[0]
        e.replace_value(tr.outputs[0], y)
        return e.commit()


class MoveTransposeAfterUnary(Rule):
    name = "move-transpose-after-unary"
    description = (
        "f(Transpose(x)) -> Transpose(f(x)) for the same unary ops. Reverse of move-transpose-before-unary; pays "
        "when the activation then sits on its producer (Conv/Gemm + activation fusion) or the Transpose reaches "
        "a MatMul that absorbs it."
    )
    reverse = "move-transpose-before-unary"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in sorted(TRANSPOSABLE_UNARY):
            for f in g.by_op(op):
                if not rewritable(f) or len(f.inputs) != 1 or not computed(g, f.outputs[0]):
                    continue
                tr = producer_op(g, f.inputs[0], "Transpose")
                if tr is None or sole_reader(g, f.inputs[0]) is not f:
                    continue
                shape = g.static_shape(tr.inputs[0])
                if shape is None or sorted(perm_of(tr, len(shape))) != list(range(len(shape))):
                    continue
                yield (f.name, tr.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        f, tr = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = tr.inputs[0]
        e = GraphEdit(g, self.name)
        applied = e.add(f.op_type, [x], [TensorType(g.dtype(f.outputs[0]), g.static_shape(x))], f.attributes)[0]  # type: ignore[arg-type]
        y = e.add1("Transpose", [applied], g.types[f.outputs[0]], perm=perm_of(tr, len(g.static_shape(x))))  # type: ignore[arg-type]
        e.replace_value(f.outputs[0], y)
        return e.commit()

"""factor-matmul-add / expand-matmul-add, factor-mul-add / expand-mul-add (distributivity).

X@A + X@B -> X@(A+B): with constant A and B onnxruntime folds A+B, so a GEMM and an Add over the activation
disappear (parallel adapters, LoRA-style branches, summed projections). A*B + A*C -> A*(B+C) saves one
elementwise multiply over the full tensor. onnxruntime does not distribute. The reverses expand again, which
pays when it exposes a merge (two MatMuls sharing X that merge-parallel-matmul can batch) or breaks a
non-constant weight sum.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, TensorType
from xrlflow.rules.common import (
    broadcast_shape, computed, matmul_pair_shares_input, matmul_shape, other_operand, producer_op, rewritable,
    shared_factors, sole_reader,
)


class FactorMatMulAdd(Rule):
    name = "factor-matmul-add"
    description = (
        "Add(X@A, X@B) -> X@(A+B) (A, B same shape, each MatMul read only by the Add). Pays directly: one GEMM "
        "and the Add over activations fewer; A+B is folded by onnxruntime when the weights are constant."
    )
    reverse = "expand-matmul-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for add in g.by_op("Add"):
            if not rewritable(add) or not computed(g, add.outputs[0]):
                continue
            pair = matmul_pair_shares_input(g, *add.inputs)
            if pair is None:
                continue
            m1, m2 = pair
            x, a = m1.inputs
            shape = matmul_shape(g.static_shape(x) or (), g.static_shape(a))  # type: ignore[arg-type]
            if shape is None or shape != g.static_shape(add.outputs[0]) or g.dtype(x) != g.dtype(a):
                continue
            yield (add.name, m1.name, m2.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        add, m1, m2 = (g.nodes[n] for n in nodes)
        a, b = m1.inputs[1], m2.inputs[1]
        e = GraphEdit(g, self.name)
        weight = e.add1("Add", [a, b], g.types[a])
        e.replace_value(add.outputs[0], e.add1("MatMul", [m1.inputs[0], weight], g.types[add.outputs[0]]))
        return e.commit()


class ExpandMatMulAdd(Rule):
    name = "expand-matmul-add"
    description = (
        "X@(A+B) -> Add(X@A, X@B) when the weight is an Add of two equal-shape values read once. Reverse of "
        "factor-matmul-add; pays by enabling merge-parallel-matmul (X@A and X@B share X) or fusions."
    )
    reverse = "factor-matmul-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            if not rewritable(mm) or not computed(g, mm.outputs[0]):
                continue
            x, w = mm.inputs
            add = producer_op(g, w, "Add")
            if add is None or sole_reader(g, w) is not mm:
                continue
            a, b = add.inputs
            shape = g.static_shape(a)
            if shape is None or shape != g.static_shape(b) or shape != g.static_shape(w):
                continue
            if len({g.dtype(x), g.dtype(a), g.dtype(b)}) != 1 or g.static_shape(x) is None:
                continue
            if matmul_shape(g.static_shape(x), shape) != g.static_shape(mm.outputs[0]):  # type: ignore[arg-type]
                continue
            yield (mm.name, add.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, add = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = mm.inputs[0]
        out_type = g.types[mm.outputs[0]]
        e = GraphEdit(g, self.name)
        terms = [e.add1("MatMul", [x, w], out_type) for w in add.inputs]
        e.replace_value(mm.outputs[0], e.add1("Add", terms, out_type))
        return e.commit()


class FactorMulAdd(Rule):
    name = "factor-mul-add"
    description = (
        "Add(A*B, A*C) -> A*(B+C) (the shared factor may be either operand of each Mul; broadcast shapes "
        "checked). Pays directly: one elementwise Mul fewer, and B+C folds when both are constant."
    )
    reverse = "expand-mul-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for add in g.by_op("Add"):
            out_shape = g.static_shape(add.outputs[0])
            if not rewritable(add) or not computed(g, add.outputs[0]) or out_shape is None:
                continue
            for m1, m2, factor in shared_factors(g, *add.inputs):
                b, c = other_operand(m1, factor), other_operand(m2, factor)
                shapes = [g.static_shape(v) for v in (factor, b, c)]
                if any(s is None for s in shapes) or len({g.dtype(v) for v in (factor, b, c)}) != 1:
                    continue
                inner = broadcast_shape(shapes[1], shapes[2])  # type: ignore[arg-type]
                if inner is None or broadcast_shape(shapes[0], inner) != out_shape:  # type: ignore[arg-type]
                    continue
                yield (add.name, m1.name, m2.name), (factor,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        add, m1, m2 = (g.nodes[n] for n in nodes)
        (factor,) = params
        b, c = other_operand(m1, factor), other_operand(m2, factor)
        dtype = g.dtype(add.outputs[0])
        e = GraphEdit(g, self.name)
        inner = e.add1("Add", [b, c], TensorType(dtype, broadcast_shape(g.static_shape(b), g.static_shape(c))))  # type: ignore[arg-type]
        e.replace_value(add.outputs[0], e.add1("Mul", [factor, inner], g.types[add.outputs[0]]))
        return e.commit()


class ExpandMulAdd(Rule):
    name = "expand-mul-add"
    description = (
        "A*(B+C) -> Add(A*B, A*C) when B+C is read only by the Mul (either operand). Reverse of factor-mul-add; "
        "pays when A*B or A*C then folds (constant operands) or fuses into a producer."
    )
    reverse = "factor-mul-add"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mul in g.by_op("Mul"):
            out_shape = g.static_shape(mul.outputs[0])
            if not rewritable(mul) or not computed(g, mul.outputs[0]) or out_shape is None:
                continue
            for position in (0, 1):
                s = mul.inputs[position]
                add = producer_op(g, s, "Add")
                if add is None or sole_reader(g, s) is not mul:
                    continue
                factor = mul.inputs[1 - position]
                shapes = [g.static_shape(v) for v in (factor, *add.inputs)]
                if any(sh is None for sh in shapes) or len({g.dtype(v) for v in (factor, *add.inputs)}) != 1:
                    continue
                terms = [broadcast_shape(shapes[0], sh) for sh in shapes[1:]]  # type: ignore[arg-type]
                if any(t is None for t in terms) or broadcast_shape(*terms) != out_shape:  # type: ignore[arg-type]
                    continue
                yield (mul.name, add.name), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mul, add = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (position,) = params
        factor = mul.inputs[1 - position]
        dtype = g.dtype(mul.outputs[0])
        e = GraphEdit(g, self.name)
        terms = [
            e.add1("Mul", [factor, v], TensorType(dtype, broadcast_shape(g.static_shape(factor), g.static_shape(v))))  # type: ignore[arg-type]
            for v in add.inputs
        ]
        e.replace_value(mul.outputs[0], e.add1("Add", terms, g.types[mul.outputs[0]]))
        return e.commit()

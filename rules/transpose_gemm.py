"""absorb-transpose-into-gemm / extract-transpose-from-gemm, transpose-gemm / untranspose-gemm.

Gemm reads its operands transposed for free (transA/transB): a Transpose feeding a Gemm is a copy kernel the
flag replaces, and the reverse frees the operand to meet another Transpose it cancels with. The transposition
algebra (alpha A'B' + beta C)^T = alpha B'^T A'^T + beta C^T moves a Transpose from a Gemm's output onto its
operands (which become flags) and its bias (a constant bias's Reshape/Transpose is folded by onnxruntime at
session creation): this is how a projection is computed transposed, `Gemm(W^T, X^T, b[:,None])`.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType, make_attributes
from xrlflow.rules.common import ints_constant, rewritable, sole_reader
from xrlflow.rules.compose_transposes import transpose_perm
from xrlflow.rules.common import computed, producer_op

FLAG = {0: "transA", 1: "transB"}


def rank2(g: Graph, value: str) -> bool:
    shape = g.static_shape(value)
    return shape is not None and len(shape) == 2


def gemm_ok(g: Graph, gemm: Node) -> bool:
    return (
        rewritable(gemm) and len(gemm.inputs) >= 2 and rank2(g, gemm.inputs[0]) and rank2(g, gemm.inputs[1])
        and computed(g, gemm.outputs[0]) and rank2(g, gemm.outputs[0])
    )


def with_flags(gemm: Node, **flags: int) -> tuple[tuple[str, Any], ...]:
    attrs = dict(gemm.attributes)
    attrs.update(flags)
    return make_attributes(**{k: v for k, v in attrs.items() if not (k in ("transA", "transB") and v == 0)})


def swapped_type(g: Graph, value: str) -> TensorType:
    shape = g.static_shape(value)
    return TensorType(g.dtype(value), (shape[1], shape[0]))  # type: ignore[index, arg-type]


class AbsorbTransposeIntoGemm(Rule):
    name = "absorb-transpose-into-gemm"
    description = (
        "Gemm(Transpose(A), B) -> Gemm(A, B, transA flipped), likewise for B. Pays directly: a Transpose kernel "
        "becomes a GEMM flag (the Transpose stays only while something else reads it)."
    )
    reverse = "extract-transpose-from-gemm"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for gemm in g.by_op("Gemm"):
            if not gemm_ok(g, gemm):
                continue
            for position in (0, 1):
                tr = producer_op(g, gemm.inputs[position], "Transpose")
                if tr is not None and transpose_perm(g, tr) == (1, 0):
                    yield (gemm.name, tr.name), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        gemm, tr = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (position,) = params
        flag = FLAG[position]
        inputs = list(gemm.inputs)
        inputs[position] = tr.inputs[0]
        e = GraphEdit(g, self.name)
        attrs = with_flags(gemm, **{flag: 1 - int(gemm.attr(flag, 0))})
        e.replace_value(gemm.outputs[0], e.add("Gemm", inputs, [g.types[gemm.outputs[0]]], attrs)[0])
        return e.commit()


class ExtractTransposeFromGemm(Rule):
    name = "extract-transpose-from-gemm"
    description = (
        "Gemm(A, B, transA=1) -> Gemm(Transpose(A), B), likewise for transB. Reverse of "
        "absorb-transpose-into-gemm; pays when the explicit Transpose then cancels or composes with the "
        "Transpose that produced A."
    )
    reverse = "absorb-transpose-into-gemm"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for gemm in g.by_op("Gemm"):
            if not gemm_ok(g, gemm):
                continue
            for position in (0, 1):
                if int(gemm.attr(FLAG[position], 0)) == 1:
                    yield (gemm.name,), (position,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        gemm = g.nodes[nodes[0]]
        (position,) = params
        operand = gemm.inputs[position]
        e = GraphEdit(g, self.name)
        inputs = list(gemm.inputs)
        inputs[position] = e.add1("Transpose", [operand], swapped_type(g, operand), perm=(1, 0))
        attrs = with_flags(gemm, **{FLAG[position]: 0})
        e.replace_value(gemm.outputs[0], e.add("Gemm", inputs, [g.types[gemm.outputs[0]]], attrs)[0])
        return e.commit()


def transposed_bias(e, g: Graph, c: str) -> str | None:
    """A value that broadcasts to (N, M) as C^T when `c` broadcasts to (M, N); None when C's shape is unknown."""
    shape = g.static_shape(c)
    if shape is None or len(shape) > 2:
        return None
    if len(shape) == 0 or shape in ((1,), (1, 1)):
        return c
    if len(shape) == 1:  # (n,) broadcasts as (1, n): its transpose is (n, 1)
        return e.add1("Reshape", [c, ints_constant(e, (shape[0], 1))], TensorType(g.dtype(c), (shape[0], 1)))
    return e.add1("Transpose", [c], swapped_type(g, c), perm=(1, 0))


def swapped_gemm(e, g: Graph, gemm: Node, out_type: TensorType) -> str | None:
    """Gemm(B, A, C^T) with flipped flags: the transpose of `gemm`'s output, of type `out_type`."""
    inputs = [gemm.inputs[1], gemm.inputs[0]]
    if len(gemm.inputs) > 2 and gemm.inputs[2]:
        bias = transposed_bias(e, g, gemm.inputs[2])
        if bias is None:
            return None
        inputs.append(bias)
    attrs = with_flags(gemm, transA=1 - int(gemm.attr("transB", 0)), transB=1 - int(gemm.attr("transA", 0)))
    return e.add("Gemm", inputs, [out_type], attrs)[0]


def bias_ok(g: Graph, gemm: Node) -> bool:
    return len(gemm.inputs) < 3 or not gemm.inputs[2] or (
        g.static_shape(gemm.inputs[2]) is not None and len(g.static_shape(gemm.inputs[2])) <= 2  # type: ignore[arg-type]
    )


class TransposeGemm(Rule):
    name = "transpose-gemm"
    description = (
        "Transpose(Gemm(A, B, C)) -> Gemm(B, A, C^T) with transA/transB flipped and exchanged. Pays because the "
        "Transpose of the output becomes flags; a constant bias's Reshape/Transpose is folded by onnxruntime."
    )
    reverse = "untranspose-gemm"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]) or transpose_perm(g, tr) != (1, 0):
                continue
            gemm = producer_op(g, tr.inputs[0], "Gemm")
            if gemm is None or not gemm_ok(g, gemm) or not bias_ok(g, gemm) or sole_reader(g, gemm.outputs[0]) is not tr:
                continue
            yield (tr.name, gemm.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, gemm = g.nodes[nodes[0]], g.nodes[nodes[1]]
        e = GraphEdit(g, self.name)
        e.replace_value(tr.outputs[0], swapped_gemm(e, g, gemm, g.types[tr.outputs[0]]))  # type: ignore[arg-type]
        return e.commit()


class UntransposeGemm(Rule):
    name = "untranspose-gemm"
    description = (
        "Gemm(A, B, C) -> Transpose(Gemm(B, A, C^T)) with flags flipped and exchanged. Reverse of "
        "transpose-gemm; pays when the Transpose then meets its consumer (cancels, composes, or folds into the "
        "next MatMul/Gemm) and the transposed product is the layout that consumer wants."
    )
    reverse = "transpose-gemm"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for gemm in g.by_op("Gemm"):
            if gemm_ok(g, gemm) and bias_ok(g, gemm):
                yield (gemm.name,), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        gemm = g.nodes[nodes[0]]
        out = gemm.outputs[0]
        e = GraphEdit(g, self.name)
        product = swapped_gemm(e, g, gemm, swapped_type(g, out))
        e.replace_value(out, e.add1("Transpose", [product], g.types[out], perm=(1, 0)))  # type: ignore[list-item]
        return e.commit()

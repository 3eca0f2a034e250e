"""move-transpose-before-split / move-transpose-after-split, move-transpose-after-concat /
move-transpose-before-concat.

A Transpose commutes with Split and Concat once the axis is renamed: Split(Transpose(x, p), a) gives the
pieces Transpose(Split(x, p[a]), p), and Concat(Transpose(x_i, p), a) = Transpose(Concat(x_i, p[a]), p). One
Transpose on the whole tensor replaces one per piece (or the reverse), which is how the per-head layout
Transposes of Q, K and V meet the merged QKV projection (or leave it) in one place.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import concat, normalize_axis, rewritable, sole_reader, split, split_sizes
from xrlflow.rules.compose_transposes import invert, permuted, transpose_perm
from xrlflow.rules.common import computed, producer_op


def split_axis(g: Graph, node: Node) -> int | None:
    shape = g.static_shape(node.inputs[0])
    return None if shape is None else normalize_axis(int(node.attr("axis", 0)), len(shape))


def transposed(e, g: Graph, value: str, perm: tuple[int, ...]) -> str:
    shape = g.static_shape(value) or e.new_types[value].shape
    dtype = g.dtype(value) or e.new_types[value].dtype
    return e.add1("Transpose", [value], TensorType(dtype, permuted(shape, perm)), perm=perm)


def piece_transposes(g: Graph, node: Node) -> tuple[list[Node], tuple[int, ...]] | None:
    """The Transposes that alone read each output of `node`, all with one permutation."""
    readers = []
    for out in node.outputs:
        reader = sole_reader(g, out) if out else None
        if reader is None or reader.op_type != "Transpose" or not rewritable(reader):
            return None
        readers.append(reader)
    perms = {transpose_perm(g, r) for r in readers}
    if len(perms) != 1 or None in perms:
        return None
    return readers, perms.pop()  # type: ignore[return-value]


def input_transposes(g: Graph, node: Node) -> tuple[list[Node], tuple[int, ...]] | None:
    """The Transposes that produce every input of `node` (each read only there), all with one permutation."""
    producers = []
    for v in node.inputs:
        tr = producer_op(g, v, "Transpose")
        if tr is None or sole_reader(g, v) is not node or not g.static_shape(tr.inputs[0]):
            return None
        producers.append(tr)
    perms = {transpose_perm(g, t) for t in producers}
    if len(perms) != 1 or None in perms:
        return None
    return producers, perms.pop()  # type: ignore[return-value]


class MoveTransposeBeforeSplit(Rule):
    name = "move-transpose-before-split"
    description = (
        "Split(x, a) whose pieces are each read only by Transpose(p) -> Split(Transpose(x, p), p^-1[a]). Pays "
        "directly (one Transpose kernel instead of one per piece) and by enabling: the Transpose meets the "
        "projection that produced x (transpose-matmul, move-transpose-before-const-binary)."
    )
    reverse = "move-transpose-after-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Split"):
            if not rewritable(node) or not computed(g, node.inputs[0]) or split_axis(g, node) is None:
                continue
            if split_sizes(g, node) is None:
                continue
            found = piece_transposes(g, node)
            if found is not None:
                yield (node.name, *(t.name for t in found[0])), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        node = g.nodes[nodes[0]]
        readers = [g.nodes[n] for n in nodes[1:]]
        perm = transpose_perm(g, readers[0])
        x = node.inputs[0]
        e = GraphEdit(g, self.name)
        t = transposed(e, g, x, perm)  # type: ignore[arg-type]
        pieces = split(e, t, e.new_types[t], invert(perm)[split_axis(g, node)], split_sizes(g, node))  # type: ignore[arg-type, index]
        for reader, piece in zip(readers, pieces):
            e.replace_value(reader.outputs[0], piece)
        return e.commit()


class MoveTransposeAfterSplit(Rule):
    name = "move-transpose-after-split"
    description = (
        "Split(Transpose(x, p), a) -> Transpose(p) of each piece of Split(x, p[a]). Reverse of "
        "move-transpose-before-split; pays when each piece's Transpose then folds into the MatMul that reads it "
        "or cancels with a following Transpose."
    )
    reverse = "move-transpose-before-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Split"):
            if not rewritable(node) or split_axis(g, node) is None or split_sizes(g, node) is None:
                continue
            tr = producer_op(g, node.inputs[0], "Transpose")
            if tr is None or not computed(g, tr.outputs[0]) or sole_reader(g, tr.outputs[0]) is not node:
                continue
            if transpose_perm(g, tr) is None or g.static_shape(tr.inputs[0]) is None or not all(node.outputs):
                continue
            yield (node.name, tr.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        node, tr = g.nodes[nodes[0]], g.nodes[nodes[1]]
        perm = transpose_perm(g, tr)
        x = tr.inputs[0]
        e = GraphEdit(g, self.name)
        pieces = split(e, x, g.types[x], perm[split_axis(g, node)], split_sizes(g, node))  # type: ignore[index, arg-type]
        for out, piece in zip(node.outputs, pieces):
            e.replace_value(out, e.add1("Transpose", [piece], g.types[out], perm=perm))
        return e.commit()


class MoveTransposeAfterConcat(Rule):
    name = "move-transpose-after-concat"
    description = (
        "Concat(Transpose(x_i, p), a) with one p -> Transpose(Concat(x_i, p[a]), p). Pays directly (one "
        "Transpose kernel instead of one per input) and by enabling the next move of that Transpose."
    )
    reverse = "move-transpose-before-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Concat"):
            if not rewritable(node) or not computed(g, node.outputs[0]) or len(node.inputs) < 2 or len(set(node.inputs)) != len(node.inputs):
                continue
            if g.static_shape(node.outputs[0]) is None:
                continue
            found = input_transposes(g, node)
            if found is not None:
                yield (node.name, *(t.name for t in found[0])), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        node = g.nodes[nodes[0]]
        trs = [g.nodes[n] for n in nodes[1:]]
        perm = transpose_perm(g, trs[0])
        rank = len(g.static_shape(node.outputs[0]))  # type: ignore[arg-type]
        axis = perm[normalize_axis(int(node.attr("axis")), rank)]  # type: ignore[index]
        e = GraphEdit(g, self.name)
        joined = concat(e, g, [t.inputs[0] for t in trs], axis)
        e.replace_value(node.outputs[0], e.add1("Transpose", [joined], g.types[node.outputs[0]], perm=perm))
        return e.commit()


class MoveTransposeBeforeConcat(Rule):
    name = "move-transpose-before-concat"
    description = (
        "Transpose(Concat(x_i, a), p) -> Concat(Transpose(x_i, p), p^-1[a]). Reverse of "
        "move-transpose-after-concat; pays when the per-input Transposes then fold into the producers of x_i "
        "(a MatMul computed transposed, a Transpose they cancel with)."
    )
    reverse = "move-transpose-after-concat"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for tr in g.by_op("Transpose"):
            if not rewritable(tr) or not computed(g, tr.outputs[0]):
                continue
            node = producer_op(g, tr.inputs[0], "Concat")
            if node is None or sole_reader(g, node.outputs[0]) is not tr or transpose_perm(g, tr) is None:
                continue
            if not all(g.static_shape(v) for v in node.inputs):
                continue
            yield (tr.name, node.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        tr, node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        perm = transpose_perm(g, tr)
        rank = len(perm)  # type: ignore[arg-type]
        axis = invert(perm)[normalize_axis(int(node.attr("axis")), rank)]  # type: ignore[arg-type]
        e = GraphEdit(g, self.name)
        pieces = [transposed(e, g, v, perm) for v in node.inputs]  # type: ignore[arg-type]
        e.replace_value(tr.outputs[0], e.add1("Concat", pieces, g.types[tr.outputs[0]], axis=axis))
        return e.commit()

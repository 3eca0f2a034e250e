"""batch-shared-weight-matmul / unbatch-shared-weight-matmul.

Two MatMuls that multiply different activations A and B (same shape except the row dim) by the same constant
weight become one MatMul over Concat(A, B) along the rows, followed by a Split (the same projection applied to
two streams: encoder/decoder sides, shared embeddings, weight-tied layers). onnxruntime does not batch ops that
share a weight; one larger GEMM replaces two launches. Constness sees through Identity aliases, as exporters
alias shared weights that way.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import (
    computed, concat, matmul_shape, normalize_axis, producer_op, rewritable, sole_reader, split, split_sizes,
)


def _rows_only_differ(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 2 and a[:-2] == b[:-2] and a[-1] == b[-1]


def _reached_by(g: Graph, tracked: list[str]) -> dict[str, int]:
    """For each tracked node, a bit mask of the tracked nodes with a path to it (one topological pass).

    Equivalent to calling Graph.reaches for every pair, which is quadratic in a weight's users times the graph
    size (a weight tied across 300 layers took 28 s to match that way).
    """
    bit = {name: 1 << i for i, name in enumerate(tracked)}
    reaches_node: dict[str, int] = {}  # node -> mask of tracked nodes it is, or that reach it
    reached_by: dict[str, int] = {}
    for name in g.topological_order():
        mask = 0
        for v in g.nodes[name].all_inputs:
            p = g.producer.get(v)
            if p is not None:
                mask |= reaches_node[p]
        if name in bit:
            reached_by[name] = mask
        reaches_node[name] = mask | bit.get(name, 0)
    return reached_by


class BatchSharedWeightMatMul(Rule):
    name = "batch-shared-weight-matmul"
    description = (
        "MatMul(A, W), MatMul(B, W) with one constant weight W (seen through Identity) -> "
        "Split(MatMul(Concat(A, B) on rows, W)). Pays directly: one larger GEMM instead of two launches; "
        "onnxruntime does not batch ops that share a weight."
    )
    reverse = "unbatch-shared-weight-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        by_weight: dict[str, list[Node]] = {}
        for mm in g.by_op("MatMul"):
            a, w = mm.inputs
            if not rewritable(mm) or not g.is_constant(w) or not computed(g, a):
                continue
            a_shape, w_shape, out_shape = g.static_shape(a), g.static_shape(w), g.static_shape(mm.outputs[0])
            if a_shape is None or w_shape is None or out_shape is None or len(a_shape) < 2 or len(w_shape) < 2:
                continue
            by_weight.setdefault(g.constant_source(w), []).append(mm)
        groups = [members for members in by_weight.values() if len(members) > 1]
        tracked = [n.name for members in groups for n in members]
        reached_by = _reached_by(g, tracked) if tracked else {}
        bit = {name: 1 << i for i, name in enumerate(tracked)}
        for members in groups:
            for i, first in enumerate(members):
                for second in members[i + 1:]:
                    a, b = first.inputs[0], second.inputs[0]
                    if a == b or g.dtype(a) != g.dtype(b):
                        continue
                    if not _rows_only_differ(g.static_shape(a), g.static_shape(b)):  # type: ignore[arg-type]
                        continue
                    if any(g.dim_is_bound(v, axis) for v in (a, b) for axis in range(len(g.static_shape(v)) - 1)):  # type: ignore[arg-type]
                        continue  # row counts (Split sizes) or batch equality fixed only by --input-shape
                    # One MatMul feeding the other: the merged node would read its own output.
                    if reached_by[second.name] & bit[first.name] or reached_by[first.name] & bit[second.name]:
                        continue
                    yield tuple(sorted((first.name, second.name))), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        first, second = g.nodes[nodes[0]], g.nodes[nodes[1]]
        w = first.inputs[1]
        e = GraphEdit(g, self.name)
        stacked = concat(e, g, [first.inputs[0], second.inputs[0]], axis=-2)
        out_shapes = [g.static_shape(n.outputs[0]) for n in (first, second)]
        merged_shape = out_shapes[0][:-2] + (out_shapes[0][-2] + out_shapes[1][-2], out_shapes[0][-1])  # type: ignore[index]
        merged_type = TensorType(g.dtype(first.outputs[0]), merged_shape)  # type: ignore[arg-type]
        y = e.add1("MatMul", [stacked, w], merged_type)
        pieces = split(e, y, merged_type, -2, [s[-2] for s in out_shapes])  # type: ignore[index]
        for node, piece in zip((first, second), pieces):
            e.replace_value(node.outputs[0], piece)
        return e.commit()


class UnbatchSharedWeightMatMul(Rule):
    name = "unbatch-shared-weight-matmul"
    description = (
        "MatMul(Concat(A, B, ...) on rows, W) read only by a Split on rows with the same sizes -> one MatMul per "
        "piece. Reverse of batch-shared-weight-matmul (undoes a batching that cost a fusion or a layout copy)."
    )
    reverse = "batch-shared-weight-matmul"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for mm in g.by_op("MatMul"):
            x, w = mm.inputs
            if not rewritable(mm) or not g.is_constant(w) or not computed(g, x):
                continue
            cat = producer_op(g, x, "Concat")
            x_shape, w_shape = g.static_shape(x), g.static_shape(w)
            out_shape = g.static_shape(mm.outputs[0])
            if cat is None or x_shape is None or w_shape is None or out_shape is None:
                continue
            if len(x_shape) < 2 or len(w_shape) < 2 or len(cat.inputs) < 2:
                continue
            if normalize_axis(cat.attr("axis", 0), len(x_shape)) != len(x_shape) - 2:
                continue
            piece_shapes = [g.static_shape(v) for v in cat.inputs]
            if any(s is None for s in piece_shapes):
                continue
            reader = sole_reader(g, mm.outputs[0])
            if reader is None or reader.op_type != "Split" or not rewritable(reader) or reader.inputs[0] != mm.outputs[0]:
                continue
            if normalize_axis(reader.attr("axis", 0), len(out_shape)) != len(out_shape) - 2:
                continue
            rows = tuple(s[-2] for s in piece_shapes)  # type: ignore[index]
            if split_sizes(g, reader) != rows or len(reader.outputs) != len(rows):
                continue
            if any(matmul_shape(s, w_shape) is None for s in piece_shapes):  # type: ignore[arg-type]
                continue
            yield (mm.name, cat.name, reader.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        mm, cat, split_node = (g.nodes[n] for n in nodes)
        w = mm.inputs[1]
        dtype = g.dtype(mm.outputs[0])
        e = GraphEdit(g, self.name)
        for piece, out in zip(cat.inputs, split_node.outputs):
            shape = matmul_shape(g.static_shape(piece), g.static_shape(w))  # type: ignore[arg-type]
            e.replace_value(out, e.add1("MatMul", [piece, w], TensorType(dtype, shape)))  # type: ignore[arg-type]
        return e.commit()

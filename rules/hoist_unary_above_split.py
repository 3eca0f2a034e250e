"""hoist-unary-above-split / sink-unary-below-split.

A Split whose every output feeds the same unary element-wise op (Relu, Sigmoid, ...) computes the same thing
as that op applied once before the Split. This is the rule that makes merges pay: after merge-parallel-conv or
merge-parallel-matmul, each branch's Relu sits behind the Split, where onnxruntime cannot fuse it into the
merged Conv/Gemm; hoisted above the Split it fuses again (Conv+Relu, FusedGemm) and n activation kernels
become one.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import UNARY_ELEMENTWISE, rewritable, sole_reader, unary_elementwise


def _same_op(a: Node, b: Node) -> bool:
    return a.op_type == b.op_type and a.attributes == b.attributes


def _split_ok(g: Graph, split: Node) -> bool:
    """A rewritable Split whose input and outputs all have known types."""
    values = (split.inputs[0],) + split.outputs
    return rewritable(split) and bool(split.outputs) and all(values) and all(v in g.types for v in values)


class HoistUnaryAboveSplit(Rule):
    name = "hoist-unary-above-split"
    description = (
        "Split whose every output is read only by the same unary element-wise op (Relu, Gelu, Sigmoid, Tanh, "
        "LeakyRelu, Erf, ...; equal attributes) -> the op once on the Split's input, then the Split. One kernel "
        "instead of n, and after a merge of parallel Convs/MatMuls the activation sits next to the merged op "
        "again, so onnxruntime's Conv+Relu (CPU EP) / Gemm+activation fusions apply."
    )
    reverse = "sink-unary-below-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for split in g.by_op("Split"):
            if not _split_ok(g, split):
                continue
            readers = [sole_reader(g, out) for out in split.outputs]
            first = readers[0]
            if not unary_elementwise(first):
                continue
            if all(unary_elementwise(r) and _same_op(r, first) for r in readers):  # type: ignore[arg-type]
                yield (split.name,) + tuple(r.name for r in readers), ()  # type: ignore[union-attr]

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        split = g.nodes[nodes[0]]
        unaries = [g.nodes[n] for n in nodes[1:]]
        x = split.inputs[0]
        f = unaries[0]
        e = GraphEdit(g, self.name)
        e.remove(split.name, *nodes[1:])
        y = e.add(f.op_type, [x], [TensorType(g.types[f.outputs[0]].dtype, g.types[x].shape)], f.attributes)[0]
        pieces = e.add(
            "Split", (y,) + split.inputs[1:], [g.types[u.outputs[0]] for u in unaries], split.attributes
        )
        for u, piece in zip(unaries, pieces):
            e.replace_value(u.outputs[0], piece)
        return e.commit()


class SinkUnaryBelowSplit(Rule):
    name = "sink-unary-below-split"
    description = (
        "Unary element-wise op whose output is read only by a Split -> Split first, the op on every piece. "
        "Reverse of hoist-unary-above-split; pays when a piece then feeds a Conv/MatMul that can absorb it "
        "or when the branches are split apart again (split-merged-matmul)."
    )
    reverse = "hoist-unary-above-split"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in sorted(UNARY_ELEMENTWISE):
            for f in g.by_op(op):
                if not unary_elementwise(f) or len(f.inputs) != 1 or f.inputs[0] not in g.types:
                    continue
                split = sole_reader(g, f.outputs[0])
                if split is None or split.op_type != "Split" or not _split_ok(g, split):
                    continue
                if split.inputs[0] != f.outputs[0]:
                    continue
                yield (f.name, split.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        f, split = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = f.inputs[0]
        x_dtype = g.types[x].dtype
        e = GraphEdit(g, self.name)
        e.remove(f.name, split.name)
        piece_types = [TensorType(x_dtype, g.types[out].shape) for out in split.outputs]
        pieces = e.add("Split", (x,) + split.inputs[1:], piece_types, split.attributes)
        for out, piece in zip(split.outputs, pieces):
            e.replace_value(out, e.add(f.op_type, [piece], [g.types[out]], f.attributes)[0])
        return e.commit()

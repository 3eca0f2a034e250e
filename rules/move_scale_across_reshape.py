"""move-scale-before-reshape / move-scale-after-reshape.

A scalar scale commutes with a Reshape: Mul(Reshape(x, S), s) = Reshape(Mul(x, s), S), likewise Div. With
move-scale-into-matmul and move-transpose-after-const-binary this carries attention's 1/sqrt(d) from the
scores back over Q's head layout (Transpose, Reshape) to Q's projection, where expand-mul-add and
fold-scale-into-matmul fold it into the weight and bias; the reverse carries it back onto the scores, where
onnxruntime folds it into FusedMatMul's alpha. The Reshape keeps its own shape input: nothing is baked.
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph
from xrlflow.rules.common import rewritable, sole_reader
from xrlflow.rules.move_scale_across_matmul import rank_ok, scalar_of
from xrlflow.rules.common import computed, producer_op


class MoveScaleBeforeReshape(Rule):
    name = "move-scale-before-reshape"
    description = (
        "Mul(Reshape(x), s) or Div(Reshape(x), s), s a constant scalar -> Reshape(x op s). Pays by enabling: "
        "the scale moves on towards the projection that computes x (expand-mul-add, fold-scale-into-matmul)."
    )
    reverse = "move-scale-after-reshape"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for op in ("Mul", "Div"):
            for node in g.by_op(op):
                if not computed(g, node.outputs[0]):
                    continue
                for value in dict.fromkeys(node.inputs):
                    reshape = producer_op(g, value, "Reshape")
                    if reshape is None or sole_reader(g, value) is not node:
                        continue
                    s = scalar_of(g, node, value)
                    x = reshape.inputs[0]
                    if s is None or not computed(g, x) or not rank_ok(g, x, s) or not rank_ok(g, value, s):
                        continue
                    if g.static_shape(node.outputs[0]) != g.static_shape(value):
                        continue
                    yield (node.name, reshape.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        node, reshape = g.nodes[nodes[0]], g.nodes[nodes[1]]
        x = reshape.inputs[0]
        operands = [x if v == reshape.outputs[0] else v for v in node.inputs]
        e = GraphEdit(g, self.name)
        scaled = e.add(node.op_type, operands, [g.types[x]], node.attributes)[0]
        out = node.outputs[0]
        e.replace_value(out, e.add("Reshape", [scaled, *reshape.inputs[1:]], [g.types[out]], reshape.attributes)[0])
        return e.commit()


class MoveScaleAfterReshape(Rule):
    name = "move-scale-after-reshape"
    description = (
        "Reshape(x op s) for Mul/Div by a constant scalar s -> Reshape(x) op s. Reverse of "
        "move-scale-before-reshape; pays by enabling: the scale moves on to the scores MatMul, whose "
        "FusedMatMul takes it as alpha."
    )
    reverse = "move-scale-before-reshape"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for reshape in g.by_op("Reshape"):
            if not rewritable(reshape) or not computed(g, reshape.outputs[0]):
                continue
            node = g.producer_of(reshape.inputs[0])
            if node is None or node.op_type not in ("Mul", "Div") or sole_reader(g, reshape.inputs[0]) is not reshape:
                continue
            for x in dict.fromkeys(node.inputs if node.op_type == "Mul" else node.inputs[:1]):
                s = scalar_of(g, node, x)
                if s is None or not computed(g, x) or g.static_shape(x) != g.static_shape(node.outputs[0]):
                    continue
                if not rank_ok(g, reshape.outputs[0], s):
                    continue
                yield (reshape.name, node.name), (x,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        reshape, node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        (x,) = params
        out = reshape.outputs[0]
        e = GraphEdit(g, self.name)
        moved = e.add("Reshape", [x, *reshape.inputs[1:]], [g.types[out]], reshape.attributes)[0]
        operands = [moved if v == x else v for v in node.inputs]
        e.replace_value(out, e.add(node.op_type, operands, [g.types[out]], node.attributes)[0])
        return e.commit()

"""fuse-conv-sum / split-conv-sum.

Conv is linear in its weight: Conv(x, W1, b1) + Conv(x, W2, b2) == Conv(x, W1 + W2, b1 + b2) when both convs
share input, kernel shape and attributes. The weight and bias sums are Adds of constants, folded by
onnxruntime at session creation, so the rewrite removes one conv and the Add. The reverse splits a conv
whose weight is a sum of two constants back into two convs (and splits a summed bias the same way).
"""

from __future__ import annotations

from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node
from xrlflow.rules.common import ConvSpec, conv_spec, rewritable, sole_reader


def _summand(g: Graph, add: Node, value: str) -> tuple[Node, ConvSpec] | None:
    """The Conv producing one operand of `add`, when that Conv has constant weight (and bias) and the Add
    is its output's only reader."""
    conv = g.producer_of(value)
    reader = sole_reader(g, value)
    if conv is None or conv.op_type != "Conv" or reader is None or reader.name != add.name:
        return None
    spec = conv_spec(g, conv)
    if spec is None or not g.is_constant(spec.weight) or (spec.bias is not None and not g.is_constant(spec.bias)):
        return None
    return conv, spec


def _constant_sum(g: Graph, value: str) -> Node | None:
    """The plain Add producing `value` from two constants of `value`'s own shape (no broadcasting)."""
    add = g.producer_of(value)
    if add is None or add.op_type != "Add" or not rewritable(add) or len(add.inputs) != 2:
        return None
    shape = g.static_shape(value)
    if shape is None or not all(g.is_constant(v) and g.static_shape(v) == shape for v in add.inputs):
        return None
    return add


class FuseConvSum(Rule):
    name = "fuse-conv-sum"
    description = (
        "Add(Conv(x, W1, b1), Conv(x, W2, b2)) with equal attributes and kernel shapes, constant weights "
        "-> Conv(x, W1 + W2, b1 + b2). Pays directly: one conv and no Add (the weight sum is folded)."
    )
    reverse = "split-conv-sum"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for add in g.by_op("Add"):
            if not rewritable(add) or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
                continue
            left, right = _summand(g, add, add.inputs[0]), _summand(g, add, add.inputs[1])
            if left is None or right is None:
                continue
            (c1, s1), (c2, s2) = left, right
            if s1.x != s2.x or s1.weight_shape != s2.weight_shape or s1.geometry != s2.geometry:
                continue
            if g.static_shape(add.outputs[0]) != s1.out_shape:
                continue
            yield (add.name, c1.name, c2.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        add, c1, c2 = (g.nodes[n] for n in nodes)
        s1, s2 = conv_spec(g, c1), conv_spec(g, c2)
        assert s1 is not None and s2 is not None
        e = GraphEdit(g, self.name)
        weight = e.add1("Add", [s1.weight, s2.weight], g.types[s1.weight])
        inputs = [s1.x, weight]
        if s1.bias is not None and s2.bias is not None:
            inputs.append(e.add1("Add", [s1.bias, s2.bias], g.types[s1.bias]))
        elif s1.bias is not None or s2.bias is not None:
            inputs.append(s1.bias or s2.bias)  # type: ignore[arg-type]
        y = e.add("Conv", inputs, [g.types[add.outputs[0]]], c1.attributes)[0]
        e.replace_value(add.outputs[0], y)
        return e.commit()


class SplitConvSum(Rule):
    name = "split-conv-sum"
    description = (
        "Conv whose constant weight is an Add of two constants of equal shape -> Add of two Convs (a bias "
        "that is such a sum is split the same way). Reverse of fuse-conv-sum."
    )
    reverse = "fuse-conv-sum"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for conv in g.by_op("Conv"):
            spec = conv_spec(g, conv)
            if spec is None:
                continue
            weight_sum = _constant_sum(g, spec.weight)
            if weight_sum is not None:
                yield (conv.name, weight_sum.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        conv, weight_sum = g.nodes[nodes[0]], g.nodes[nodes[1]]
        spec = conv_spec(g, conv)
        assert spec is not None
        biases: tuple[str | None, str | None] = (spec.bias, None)
        if spec.bias is not None:
            bias_sum = _constant_sum(g, spec.bias)
            if bias_sum is not None:
                biases = (bias_sum.inputs[0], bias_sum.inputs[1])
        out_type = g.types[conv.outputs[0]]
        e = GraphEdit(g, self.name)
        outs = []
        for w, b in zip(weight_sum.inputs, biases):
            inputs = [spec.x, w] + ([b] if b is not None else [])
            outs.append(e.add("Conv", inputs, [out_type], conv.attributes)[0])
        e.replace_value(conv.outputs[0], e.add1("Add", outs, out_type))
        return e.commit()

"""batch-shared-weight-conv / unbatch-shared-weight-conv.

Two Convs applying the same constant weight (exporters alias a shared weight through Identity nodes, so the
weight is compared by its constant source) with the same attributes to different activations of equal shape
up to the batch dim become one Conv over the activations concatenated on the batch axis, followed by a Split:
one launch instead of two (siamese branches, weight-tied towers). onnxruntime does not batch such convs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node
from xrlflow.rules.common import (
    ConvSpec, concat, conv_spec, normalize_axis, rewritable, sole_reader, split, split_sizes, with_dim,
)


def _batchable(g: Graph, node: Node) -> ConvSpec | None:
    spec = conv_spec(g, node)
    if spec is None or not g.is_constant(spec.weight) or (spec.bias is not None and not g.is_constant(spec.bias)):
        return None
    return spec


def _reached_members(g: Graph, start: str, members: set[str]) -> set[str]:
    """The members that some path from node `start` leads to (Graph.reaches, for many targets at once)."""
    stack = [c for v in g.nodes[start].outputs for c in g.consumers.get(v, ())]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(c for v in g.nodes[name].outputs for c in g.consumers.get(v, ()))
    return seen & members


class BatchSharedWeightConv(Rule):
    name = "batch-shared-weight-conv"
    description = (
        "Conv(A, W), Conv(B, W) with one constant weight source and equal attributes, A and B of equal shape "
        "but the batch dim -> Split(Conv(Concat(A, B, axis 0), W), axis 0). Pays directly: one launch, a "
        "fuller kernel. Never offered when one conv feeds the other (that would be a cycle)."
    )
    reverse = "unbatch-shared-weight-conv"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        groups: dict[tuple[Any, ...], list[tuple[Node, ConvSpec]]] = defaultdict(list)
        for node in g.by_op("Conv"):
            spec = _batchable(g, node)
            if spec is None or g.dim_is_bound(spec.x, 0):
                continue  # a batch dim bound only by --input-shape must not be baked into the Split sizes
            bias_source = None if spec.bias is None else g.constant_source(spec.bias)
            x_shape = g.static_shape(spec.x)
            key = (g.constant_source(spec.weight), bias_source, spec.geometry, x_shape[1:], g.dtype(spec.x))  # type: ignore[index]
            groups[key].append((node, spec))
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: m[0].name)
            names = {m[0].name for m in members}
            # One traversal per member (not one per pair: a weight-tied chain of m convs would cost m^2 walks)
            reached = {m[0].name: _reached_members(g, m[0].name, names) for m in members}
            for i, (first, first_spec) in enumerate(members):
                for second, second_spec in members[i + 1:]:
                    if first_spec.x == second_spec.x:
                        continue  # the same activation twice: nothing to batch
                    if second.name in reached[first.name] or first.name in reached[second.name]:
                        continue  # one conv feeds the other: the batched conv would read its own output
                    yield (first.name, second.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        first, second = g.nodes[nodes[0]], g.nodes[nodes[1]]
        s1, s2 = conv_spec(g, first), conv_spec(g, second)
        assert s1 is not None and s2 is not None
        batches = [s1.out_shape[0], s2.out_shape[0]]
        e = GraphEdit(g, self.name)
        inputs = [concat(e, g, [s1.x, s2.x], axis=0), s1.weight] + ([s1.bias] if s1.bias is not None else [])
        out_type = with_dim(g.types[first.outputs[0]], 0, sum(batches))
        y = e.add("Conv", inputs, [out_type], first.attributes)[0]
        for conv, piece in zip((first, second), split(e, y, out_type, 0, batches)):
            e.replace_value(conv.outputs[0], piece)
        return e.commit()


class UnbatchSharedWeightConv(Rule):
    name = "unbatch-shared-weight-conv"
    description = (
        "Conv over a Concat on the batch axis whose output's only reader is a Split on the batch axis with the "
        "same sizes -> one Conv per concatenated input. Reverse of batch-shared-weight-conv."
    )
    reverse = "batch-shared-weight-conv"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for conv in g.by_op("Conv"):
            spec = conv_spec(g, conv)
            if spec is None:
                continue
            cat = g.producer_of(spec.x)
            if cat is None or cat.op_type != "Concat" or not rewritable(cat) or len(cat.inputs) < 2:
                continue
            if normalize_axis(cat.attr("axis", 0), len(spec.out_shape)) != 0:
                continue
            part_shapes = [g.static_shape(v) for v in cat.inputs]
            if any(s is None for s in part_shapes):
                continue
            reader = sole_reader(g, conv.outputs[0])
            if reader is None or reader.op_type != "Split" or not rewritable(reader) or reader.inputs[0] != conv.outputs[0]:
                continue
            if normalize_axis(reader.attr("axis", 0), len(spec.out_shape)) != 0:
                continue
            batches = tuple(s[0] for s in part_shapes)  # type: ignore[index]
            if split_sizes(g, reader) != batches or len(reader.outputs) != len(batches):
                continue
            yield (conv.name, cat.name, reader.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        conv, cat, split_node = (g.nodes[n] for n in nodes)
        out_type = g.types[conv.outputs[0]]
        e = GraphEdit(g, self.name)
        for part, out in zip(cat.inputs, split_node.outputs):
            t = with_dim(out_type, 0, g.static_shape(part)[0])  # type: ignore[index]
            y = e.add("Conv", (part,) + conv.inputs[1:], [t], conv.attributes)[0]
            e.replace_value(out, y)
        return e.commit()

"""merge-parallel-conv / split-merged-conv, and the Conv description the other conv families share.

Convs that read the same activation X with constant weights of one kernel shape and equal attributes become
one Conv over the weights concatenated on the output-channel axis, followed by a Split on the channel axis.
onnxruntime does not do this itself; it removes kernel launches (measured 1.28-1.42x for 1x1 convs on the
CUDA EP), though on real CNNs it can lose ORT's Conv+Relu fusions: the reverse lets the search undo it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

from xrlflow.engine import Rule
from xrlflow.ir import Graph, Node, TensorType, make_attributes
from xrlflow.rules.common import concat, merge_order, normalize_axis, plain, sole_reader, split, split_sizes


@dataclass(frozen=True)
class ConvSpec:
    """A Conv with explicit pads (auto_pad NOTSET), every attribute spelled out with ONNX defaults filled in."""

    x: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]  # (out channels, in channels / group, *kernel)
    out_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begins of every spatial axis, then ends
    dilations: tuple[int, ...]
    group: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def geometry(self) -> tuple[Any, ...]:
        """What two convs must share to be merged or batched: kernel, strides, pads, dilations, group."""
        return (self.kernel, self.strides, self.pads, self.dilations, self.group)


def conv_spec(g: Graph, node: Node) -> ConvSpec | None:
    """The ConvSpec of a plain Conv with static shapes and explicit padding; None for anything else."""
    if node.op_type != "Conv" or not plain(node) or len(node.outputs) != 1:
        return None
    if node.attr("auto_pad", "NOTSET") != "NOTSET" or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    x_shape, w_shape, out_shape = g.static_shape(x), g.static_shape(w), g.static_shape(node.outputs[0])
    if x_shape is None or w_shape is None or out_shape is None or len(w_shape) < 3 or len(x_shape) != len(w_shape):
        return None
    if len({g.dtype(v) for v in (x, w, node.outputs[0]) + ((bias,) if bias else ())}) != 1:
        return None
    if bias is not None and g.static_shape(bias) != (w_shape[0],):
        return None
    spatial = len(w_shape) - 2
    kernel_attr = node.attr("kernel_shape")
    if kernel_attr is not None and tuple(kernel_attr) != tuple(w_shape[2:]):
        return None
    strides = tuple(node.attr("strides", (1,) * spatial))
    pads = tuple(node.attr("pads", (0,) * (2 * spatial)))
    dilations = tuple(node.attr("dilations", (1,) * spatial))
    if len(strides) != spatial or len(pads) != 2 * spatial or len(dilations) != spatial:
        return None
    return ConvSpec(x, w, bias, tuple(w_shape), tuple(out_shape), strides, pads, dilations, int(node.attr("group", 1)))


def resized_conv_attributes(node: Node, kernel: tuple[int, ...], pads: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    """The node's attributes with new pads (and kernel_shape, where the node spells it out)."""
    attrs = dict(node.attributes)
    attrs["pads"] = tuple(pads)
    if "kernel_shape" in attrs:
        attrs["kernel_shape"] = tuple(kernel)
    return make_attributes(**attrs)


def with_dim(t: TensorType, axis: int, size: int) -> TensorType:
    shape = list(t.shape)  # type: ignore[arg-type]
    shape[axis] = size
    return t.with_shape(shape)


def _mergeable(g: Graph, node: Node) -> ConvSpec | None:
    spec = conv_spec(g, node)
    if spec is None or spec.group != 1 or not g.is_constant(spec.weight) or spec.weight == spec.x:
        return None
    if spec.bias is not None and not g.is_constant(spec.bias):
        return None
    return spec


class MergeParallelConv(Rule):
    name = "merge-parallel-conv"
    description = (
        "Convs sharing an input, with constant weights of one kernel shape and equal strides/pads/dilations "
        "(group 1) -> one Conv on the weights concatenated on axis 0 (+ concatenated biases) and a Split on "
        "the channel axis. Pays directly: one larger conv instead of several launches."
    )
    reverse = "split-merged-conv"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        groups: dict[tuple[Any, ...], list[Node]] = defaultdict(list)
        for node in g.by_op("Conv"):
            spec = _mergeable(g, node)
            if spec is not None:
                groups[(spec.x, spec.geometry, spec.bias is not None)].append(node)
        for members in groups.values():
            if len(members) >= 2:
                yield merge_order(g, [n.name for n in members], [n.outputs[0] for n in members]), (len(members),)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        convs = [g.nodes[n] for n in nodes]
        specs = [conv_spec(g, c) for c in convs]
        widths = [s.out_channels for s in specs]  # type: ignore[union-attr]
        first = specs[0]
        assert first is not None
        e = g.edit(self.name)
        inputs = [first.x, concat(e, g, [s.weight for s in specs], axis=0)]  # type: ignore[union-attr]
        if first.bias is not None:
            inputs.append(concat(e, g, [s.bias for s in specs], axis=0))  # type: ignore[union-attr, misc]
        out_type = with_dim(g.types[convs[0].outputs[0]], 1, sum(widths))
        y = e.add("Conv", inputs, [out_type], convs[0].attributes)[0]
        for conv, piece in zip(convs, split(e, y, out_type, 1, widths)):
            e.replace_value(conv.outputs[0], piece)
        return e.commit()


class SplitMergedConv(Rule):
    name = "split-merged-conv"
    description = (
        "Conv with a constant weight whose only reader is a Split on the channel axis -> one Conv per piece "
        "on the split weights (and biases). Reverse of merge-parallel-conv: restores per-branch Conv+Relu "
        "fusions that a merge can lose."
    )
    reverse = "merge-parallel-conv"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for conv in g.by_op("Conv"):
            spec = _mergeable(g, conv)
            if spec is None:
                continue
            reader = sole_reader(g, conv.outputs[0])
            if reader is None or reader.op_type != "Split" or not plain(reader) or reader.inputs[0] != conv.outputs[0]:
                continue
            if normalize_axis(reader.attr("axis", 0), len(spec.out_shape)) != 1:
                continue
            sizes = split_sizes(g, reader)
            if sizes is None or len(sizes) < 2 or sum(sizes) != spec.out_channels or len(sizes) != len(reader.outputs):
                continue
            yield (conv.name, reader.name), (tuple(sizes),)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        (sizes,) = params
        conv, split_node = g.nodes[nodes[0]], g.nodes[nodes[1]]
        spec = conv_spec(g, conv)
        assert spec is not None
        e = g.edit(self.name)
        weights = split(e, spec.weight, g.types[spec.weight], 0, sizes)
        biases: list[str | None] = [None] * len(sizes)
        if spec.bias is not None:
            biases = list(split(e, spec.bias, g.types[spec.bias], 0, sizes))
        out_type = g.types[conv.outputs[0]]
        for out, w, b, size in zip(split_node.outputs, weights, biases, sizes):
            inputs = [spec.x, w] + ([b] if b is not None else [])
            y = e.add("Conv", inputs, [with_dim(out_type, 1, size)], conv.attributes)[0]
            e.replace_value(out, y)
        return e.commit()

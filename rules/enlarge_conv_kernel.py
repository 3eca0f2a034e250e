"""enlarge-conv-kernel / shrink-conv-kernel.

A Conv whose input is shared with a sibling Conv of a larger kernel gets its kernel zero-padded to the
sibling's size (a Pad node on the constant weight, which onnxruntime folds at session creation) and its
pads widened by the same amount, so it computes exactly the same output. On its own this makes the graph
slower (a bigger kernel); it pays only by enabling merge-parallel-conv on the pair (TASO's 1x1 -> 3x3
enlargement, the case where an RL agent must accept a temporary loss).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from xrlflow.engine import Rule
from xrlflow.graph_edit import GraphEdit
from xrlflow.ir import Graph, Node, TensorType
from xrlflow.rules.common import (
    INT64, ConvSpec, constant_ints, conv_spec, ints_constant, resized_conv_attributes, rewritable,
)


def _plain_dense(g: Graph, node: Node) -> ConvSpec | None:
    """A group-1, undilated Conv with a constant weight (both ends of an enlargement must be one)."""
    spec = conv_spec(g, node)
    if spec is None or spec.group != 1 or any(d != 1 for d in spec.dilations) or not g.is_constant(spec.weight):
        return None
    return spec


class EnlargeConvKernel(Rule):
    name = "enlarge-conv-kernel"
    description = (
        "Conv sharing its input with a sibling Conv of a larger kernel (equal strides, undilated, group 1) -> "
        "the same Conv with its weight zero-padded to the sibling's kernel and its pads widened by half the "
        "difference. Slower alone; enables merge-parallel-conv on the pair."
    )
    reverse = "shrink-conv-kernel"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for node in g.by_op("Conv"):
            spec = _plain_dense(g, node)
            if spec is None:
                continue
            targets: dict[tuple[int, ...], str] = {}  # one match per target kernel: its first sibling by name
            for name in sorted(set(g.consumers.get(spec.x, ()))):
                if name == node.name:
                    continue
                sibling = _plain_dense(g, g.nodes[name])
                if sibling is None or sibling.x != spec.x or sibling.strides != spec.strides:
                    continue
                if len(sibling.kernel) != len(spec.kernel) or sibling.kernel == spec.kernel:
                    continue
                growth = [big - small for big, small in zip(sibling.kernel, spec.kernel)]
                if all(d >= 0 and d % 2 == 0 for d in growth):
                    targets.setdefault(sibling.kernel, name)
            for kernel, sibling_name in targets.items():
                yield (node.name, sibling_name), (kernel,)

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        (kernel,) = params
        conv = g.nodes[nodes[0]]
        spec = conv_spec(g, conv)
        assert spec is not None
        half = [(big - small) // 2 for big, small in zip(kernel, spec.kernel)]
        spatial = len(kernel)
        e = GraphEdit(g, self.name)
        # Pad's pads: begins of every weight axis, then ends; the two channel axes stay as they are.
        pad_amounts = ints_constant(e, [0, 0] + half + [0, 0] + half)
        # The zero fill is a Cast of an int constant, not a constant: onnxruntime's PadFusion (level 1, run
        # before constant folding) fuses a Pad whose inputs are all constant into the Conv reading it without
        # checking that it feeds the Conv's data input, which breaks the model when it feeds the weight. A
        # computed fill keeps PadFusion off until ConstantFolding folds the Cast and the Pad together.
        w_type = g.types[spec.weight]
        zero = e.add1("Cast", [e.add1("Constant", [], TensorType(INT64, ()), value_int=0)], TensorType(w_type.dtype, ()), to=w_type.dtype)
        weight = e.add1("Pad", [spec.weight, pad_amounts, zero], w_type.with_shape(spec.weight_shape[:2] + tuple(kernel)))
        pads = tuple(p + half[i % spatial] for i, p in enumerate(spec.pads))
        inputs = [spec.x, weight] + ([spec.bias] if spec.bias is not None else [])
        y = e.add("Conv", inputs, [g.types[conv.outputs[0]]], resized_conv_attributes(conv, tuple(kernel), pads))[0]
        e.replace_value(conv.outputs[0], y)
        return e.commit()


def _symmetric_spatial_zero_pad(g: Graph, pad: Node, spatial: int) -> tuple[int, ...] | None:
    """Per spatial axis, the zeros a constant Pad adds on each side of a conv weight; None unless it pads
    only the spatial axes, symmetrically, with zeros."""
    if pad.op_type != "Pad" or not rewritable(pad) or pad.attr("mode", "constant") != "constant":
        return None
    if len(pad.inputs) < 2 or len(pad.inputs) > 3 or not g.is_constant(pad.outputs[0]):
        return None  # an `axes` input (opset 18) is left out: rare on weights
    if len(pad.inputs) == 3 and pad.inputs[2]:
        fill_value = pad.inputs[2]
        cast = g.producer_of(fill_value)
        if cast is not None and cast.op_type == "Cast" and rewritable(cast):
            fill_value = cast.inputs[0]  # a cast zero is zero (the form enlarge-conv-kernel writes)
        fill = g.constant_array(fill_value)
        if fill is None or fill.size != 1 or float(np.asarray(fill).reshape(-1)[0]) != 0.0:
            return None
    amounts = constant_ints(g, pad.inputs[1])
    rank = spatial + 2
    if amounts is None or len(amounts) != 2 * rank:
        return None
    begins, ends = amounts[:rank], amounts[rank:]
    if begins != ends or any(b != 0 for b in begins[:2]) or any(b < 0 for b in begins) or not any(begins[2:]):
        return None
    return begins[2:]


class ShrinkConvKernel(Rule):
    name = "shrink-conv-kernel"
    description = (
        "Conv whose weight is a constant, symmetric, spatial-only zero Pad and whose pads cover the padding "
        "-> the Conv on the unpadded weight with pads reduced. Reverse of enlarge-conv-kernel."
    )
    reverse = "enlarge-conv-kernel"

    def find(self, g: Graph) -> Iterator[tuple[tuple[str, ...], tuple[Any, ...]]]:
        for conv in g.by_op("Conv"):
            spec = conv_spec(g, conv)
            if spec is None or any(d != 1 for d in spec.dilations):
                continue
            pad = g.producer_of(spec.weight)
            if pad is None or pad.op_type != "Pad":
                continue
            added = _symmetric_spatial_zero_pad(g, pad, len(spec.kernel))
            if added is None or g.static_shape(pad.inputs[0]) is None:
                continue
            spatial = len(added)
            if all(p >= added[i % spatial] for i, p in enumerate(spec.pads)):
                yield (conv.name, pad.name), ()

    def rewrite(self, g: Graph, nodes: tuple[str, ...], params: tuple[Any, ...]) -> Graph:
        conv, pad = g.nodes[nodes[0]], g.nodes[nodes[1]]
        spec = conv_spec(g, conv)
        assert spec is not None
        added = _symmetric_spatial_zero_pad(g, pad, len(spec.kernel))
        assert added is not None
        weight = pad.inputs[0]
        kernel = tuple(g.static_shape(weight)[2:])  # type: ignore[index]
        pads = tuple(p - added[i % len(added)] for i, p in enumerate(spec.pads))
        e = GraphEdit(g, self.name)
        inputs = [spec.x, weight] + ([spec.bias] if spec.bias is not None else [])
        y = e.add("Conv", inputs, [g.types[conv.outputs[0]]], resized_conv_attributes(conv, kernel, pads))[0]
        e.replace_value(conv.outputs[0], y)
        return e.commit()
